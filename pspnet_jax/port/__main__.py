"""python -m pspnet_jax.port SRC --out DIR [--layout auto] [--num-classes N] [--backbone-only]
                            [--prototxt DEPLOY.prototxt]

Ports a PyTorch checkpoint (.pth or .safetensors) or one of the authors' Caffe releases
(.caffemodel, no Caffe needed; --prototxt checks it against its deploy prototxt) to a model
directory that ``pspnet_jax.checkpoint.load_model`` (and so train.py / eval.py) loads.
Prints the layout it chose, what it dropped and whether the heads are fresh. One line on
stderr and exit status 2 when the file cannot be ported.
"""

import argparse
import sys

from pspnet_jax import checkpoint, errors, output_dir
from pspnet_jax.port.convert import AUTO, CAFFE, LAYOUTS, port_checkpoint


@errors.command
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog='python -m pspnet_jax.port',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument('src', help='.pth, .safetensors or .caffemodel file')
  ap.add_argument('--out', required=True, help='model directory to write')
  ap.add_argument('--layout', default=AUTO, choices=[AUTO, *LAYOUTS, CAFFE])
  ap.add_argument(
    '--prototxt', default=None, help='a Caffe deploy .prototxt to check a .caffemodel against'
  )
  ap.add_argument(
    '--num-classes',
    type=errors.int_at_least(1),
    default=None,
    help='checked against the checkpoint; sets the classes of fresh heads',
  )
  ap.add_argument(
    '--backbone-only', action='store_true', help='port layer0..layer4 only and initialise new heads'
  )
  ap.add_argument(
    '--seed', type=errors.int_at_least(0), default=0, help='initialisation seed of fresh heads'
  )
  ap.add_argument(
    '--trust-pickle',
    action='store_true',
    help='allow .pth files holding arbitrary Python objects (runs their code)',
  )
  args = ap.parse_args(argv)
  output_dir.claim(args.out, marker=checkpoint.MODEL_CONFIG, what='model directory')
  ported = port_checkpoint(
    args.src,
    args.layout,
    args.num_classes,
    backbone_only=args.backbone_only,
    seed=args.seed,
    trust_pickle=args.trust_pickle,
    prototxt=args.prototxt,
  )
  print(ported.report())
  out = checkpoint.save_model(args.out, ported.model, ported.metadata())
  print(f'wrote:   {out} (pspnet_jax.checkpoint.load_model reads it)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
