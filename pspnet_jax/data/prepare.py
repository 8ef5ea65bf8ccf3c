"""Prepares a dataset: python -m pspnet_jax.data.prepare NAME --data-dir DIR [--manual-dir DIR]

Extra builder options go as --option KEY=VALUE (e.g. --option root=/data/mine for
segmentation_folder, --option num_train=2048 for synthetic_shapes); values are parsed as
JSON when they can be, otherwise kept as strings.
"""

import argparse
import json
import logging

from pspnet_jax import errors
from pspnet_jax.data import builders, datasets


def _parse_option(text: str):
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'--option wants KEY=VALUE, got {text!r}')
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


@errors.command
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('name', choices=sorted(builders.BUILDERS))
  parser.add_argument('--data-dir', required=True, help='where prepared datasets live')
  parser.add_argument(
    '--manual-dir', help='raw files a builder cannot download (see docs/datasets.md)'
  )
  parser.add_argument(
    '--skip-bad-examples',
    action='store_true',
    help='drop and count unusable raw examples instead of failing',
  )
  parser.add_argument(
    '--option',
    action='append',
    type=_parse_option,
    default=[],
    help='builder keyword KEY=VALUE (repeatable)',
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  info = datasets.prepare(
    args.name,
    args.data_dir,
    args.manual_dir,
    skip_bad_examples=args.skip_bad_examples,
    **dict(args.option),
  )
  skipped = info.metadata.get('skipped_examples', 0)
  print(
    f'{info.name}: {info.num_classes} classes, splits {info.splits}, '
    f'base size {info.base_size}, skipped bad examples: {skipped}'
  )
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
