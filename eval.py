"""Evaluate a checkpoint with the semseg protocol:

  python eval.py --config configs/X.py --workdir DIR          # latest checkpoint in DIR
  python eval.py --config configs/X.py --checkpoint PATH [--out DIR]
      [--config.eval.mode=slide] ["--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"]
      [--config.eval.flip=True] [--config.eval.crop_size=473] [--config.eval.base_size=512]
      [--save_predictions]

Writes DIR/eval/metrics.json (miou, macc, allacc, fwiou, per_class, images_per_second,
processes, devices, per_process_images), a table and a per-class IoU chart; with
--save_predictions also label / colour / overlay PNGs (label PNGs in the dataset's own ids,
e.g. Cityscapes labelIds). Every key of config.eval (pspnet_jax.evaluation.EvalConfig) can be
set with --config.eval.KEY=VALUE; --config.eval.per_scale=True adds each scale's own metrics.

Runs on every local device; multi-host like train.py (TPU slices and SLURM are detected,
elsewhere --coordinator, --num_processes and --process_id): each process evaluates its own
share of the images and process 0 writes the outputs.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import config_file, errors, mesh
from pspnet_jax.evaluation import evaluate_checkpoint

if __name__ == '__main__':  # before absl loads it: each fault of the config file one line
  sys.argv = config_file.prepare_argv(sys.argv)
config_flags.DEFINE_config_file('config', config_file.DEFAULT, 'Configuration file.')
flags.DEFINE_string('workdir', None, 'Training workdir: evaluates its latest checkpoint.')
flags.DEFINE_string('checkpoint', None, 'A model directory (port CLI output) or a workdir.')
flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/eval or CHECKPOINT/eval).')
flags.DEFINE_bool('save_predictions', False, 'Write prediction PNGs under OUT/predictions.')
flags.DEFINE_integer('max_examples', 0, 'Evaluate only the first N examples (0: all).')
flags.DEFINE_string('coordinator', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
FLAGS = flags.FLAGS


@errors.command
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError('give exactly one of --workdir and --checkpoint')
  mesh.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  path = FLAGS.workdir or FLAGS.checkpoint
  out = FLAGS.out or os.path.join(path, 'eval')
  evaluate_checkpoint(
    FLAGS.config,
    path,
    out,
    save_predictions=FLAGS.save_predictions,
    max_examples=FLAGS.max_examples,
  )


if __name__ == '__main__':
  app.run(main)
