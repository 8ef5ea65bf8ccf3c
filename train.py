"""Train PSPNet: python train.py --config configs/X.py --workdir DIR [--config.key=value ...]

Resumes from the latest checkpoint in DIR. Multi-host: launched on every host of a TPU
slice or as one SLURM task per GPU, JAX's environment detection initialises
jax.distributed; elsewhere pass --coordinator, --num_processes and --process_id.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import config_file, errors, mesh
from pspnet_jax.train import TrainingDiverged, TrainingInterrupted, train_and_evaluate

if __name__ == '__main__':  # before absl loads it: each fault of the config file one line
  sys.argv = config_file.prepare_argv(sys.argv)
config_flags.DEFINE_config_file('config', config_file.DEFAULT, 'Training configuration file.')
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, logs and evaluation.', required=True
)
flags.DEFINE_string('coordinator', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')
FLAGS = flags.FLAGS


@errors.command
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  mesh.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  try:
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except TrainingDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(errors.EXIT_INTERRUPTED)
  except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, final evaluation)
    print(
      f'\ninterrupted: stopped; {FLAGS.workdir} keeps its checkpoints (run the same command '
      'to resume from the newest)',
      file=sys.stderr,
    )
    sys.exit(errors.EXIT_INTERRUPTED)
  if metrics:
    print(
      f'validation mIoU {metrics["miou"]:.4f}  mAcc {metrics["macc"]:.4f}  '
      f'allAcc {metrics["allacc"]:.4f}'
    )


if __name__ == '__main__':
  app.run(main)
