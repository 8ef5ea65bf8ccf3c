"""Segment your own images with a saved model, using the evaluation protocol.

  python -m pspnet_jax.predict IMAGE_OR_FOLDER --checkpoint MODEL_DIR --out DIR \\
      [--mode whole|slide] [--scales 0.5,1.0,...] [--flip|--no-flip] [--base-size N] [--crop-size N]

For each RGB image ``<stem>.<ext>`` writes ``DIR/<stem>.png`` (class ids, uint8),
``DIR/<stem>_color.png`` (palette colours) and ``DIR/<stem>_overlay.jpg`` (images whose names
differ only by the extension keep it: ``a.jpg.png``, ``a.png.png``); it refuses, before any
work, a ``DIR`` where that would overwrite an input image. Images are read upright (EXIF
orientation applied) and as RGB, 16-bit ones scaled to 8 bits by their depth
(``evaluation.images.read_rgb``, as the server reads them). ``MODEL_DIR`` is
a model directory (``pspnet_jax.checkpoint``: the port CLI's output, or one step of a
training run). The palette and class names come from its metadata (``palette``,
``class_names``, at the top level or under ``dataset``) when present, else the Pascal VOC
colour map. Images are normalised with the model's own mean and std (its config's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from pspnet_jax import checkpoint, errors, output_dir
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.images import list_images, read_rgb
from pspnet_jax.evaluation.outputs import PREDICTION_SUFFIXES, write_prediction
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator
from pspnet_jax.palette import as_palette


def output_stems(files: list[str]) -> dict[str, str]:
  """The output name of each input file: its stem (``a.jpg`` -> ``a``), or, where two inputs
  share a stem (``a.jpg``, ``a.png``), the whole file name (``a.jpg``, ``a.png``), so that no
  output of the run replaces another."""
  stem = lambda f: os.path.splitext(os.path.basename(f))[0]
  counts: dict[str, int] = {}
  for f in files:
    counts[stem(f)] = counts.get(stem(f), 0) + 1
  return {f: stem(f) if counts[stem(f)] == 1 else os.path.basename(f) for f in files}


def parse_scales(text: str) -> tuple[float, ...]:
  try:
    scales = tuple(float(s) for s in text.split(',') if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'--scales wants numbers separated by commas, got {text!r}'
    ) from None
  if not scales:
    raise argparse.ArgumentTypeError('--scales is empty')
  if min(scales) <= 0:
    raise argparse.ArgumentTypeError(f'--scales {text}: every scale must be > 0')
  return scales


def add_protocol_arguments(ap: argparse.ArgumentParser):
  """The evaluation protocol's flags (``--mode``, ``--scales``, ``--flip``, ``--base-size``,
  ``--crop-size``, ``--window-batch``), shared by ``predict`` and ``serve``, with the same
  defaults, so the two commands segment alike; ``protocol_config`` reads them."""
  ap.add_argument('--mode', choices=('whole', 'slide'), default='slide')
  ap.add_argument(
    '--scales',
    type=parse_scales,
    default=(1.0,),
    help='comma-separated, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default 1.0)',
  )
  ap.add_argument(
    '--flip',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='average with the horizontally flipped image (default on, as semseg)',
  )
  ap.add_argument(
    '--base-size',
    type=errors.int_at_least(1),
    default=512,
    help='long side at scale 1.0 (Cityscapes: 2048)',
  )
  ap.add_argument(
    '--crop-size',
    type=errors.int_at_least(1),
    default=473,
    help='sliding window side (Cityscapes: 713)',
  )
  ap.add_argument(
    '--window-batch',
    type=errors.int_at_least(0),
    default=0,
    help='windows per network call (default 0: one per local device)',
  )


def protocol_config(args: argparse.Namespace) -> EvalConfig:
  """The ``EvalConfig`` of ``add_protocol_arguments``' flags."""
  return EvalConfig(
    mode=args.mode,
    scales=args.scales,
    flip=args.flip,
    base_size=args.base_size,
    crop_size=args.crop_size,
    window_batch=args.window_batch,
  )


def model_classes(model_dir: str, num_classes: int) -> tuple[np.ndarray, list[str]]:
  """(palette [C, 3] uint8, class names) of a model directory, from its metadata
  (``palette``, ``class_names``, at the top level or under ``dataset``) when present, else
  the Pascal VOC colour map and ``class_<i>``."""
  metadata = checkpoint.model_metadata(model_dir)
  try:
    palette = as_palette(checkpoint.metadata_value(metadata, 'palette'), num_classes)
  except UserError as e:
    raise UserError(f'{model_dir}: its metadata {e}') from None
  names = checkpoint.metadata_value(metadata, 'class_names')
  if names is None or len(names) != num_classes:
    names = [f'class_{i}' for i in range(num_classes)]
  return palette, [str(n) for n in names]


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog='python -m pspnet_jax.predict', description=__doc__.split('\n\n')[0]
  )
  ap.add_argument('input', help='an image file or a folder of images')
  ap.add_argument(
    '--checkpoint', required=True, help='model directory (port CLI output or a training step)'
  )
  ap.add_argument('--out', required=True, help='output folder')
  add_protocol_arguments(ap)
  return ap


@errors.command
def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  files = list_images(args.input)
  stems = output_stems(files)
  output_dir.claim(
    args.out,
    writes=[s + suffix for s in stems.values() for suffix in PREDICTION_SUFFIXES],
    protect=files,
  )
  renamed = sorted(f for f in files if stems[f] == os.path.basename(f))
  if renamed:
    print(
      f'note: {len(renamed)} images share a name with another but for the extension; their '
      f'outputs keep the extension ({stems[renamed[0]]}.png, ...)',
      file=sys.stderr,
      flush=True,
    )
  model = checkpoint.load_model(args.checkpoint)
  palette, _ = model_classes(args.checkpoint, model.config.num_classes)
  evaluator = Evaluator(model, protocol_config(args))
  start = time.perf_counter()
  failed = []
  for path in files:
    t = time.perf_counter()
    try:
      image = read_rgb(path)
    except UserError as e:  # one bad file in a folder: say so, go on with the others
      print(f'warning: {e} (skipped)', file=sys.stderr, flush=True)
      failed.append(path)
      continue
    pred = evaluator.predict(image)
    stem = stems[path]
    write_prediction(args.out, stem, pred, palette=palette, image=image)
    print(
      f'{path}: {image.shape[1]}x{image.shape[0]} -> {os.path.join(args.out, stem)}.png '
      f'({time.perf_counter() - t:.2f} s)',
      flush=True,
    )
  total = time.perf_counter() - start
  print(
    f'{len(files) - len(failed)} images in {total:.1f} s ({evaluator.compilations} compilations)'
  )
  if failed:
    raise UserError(
      f'{len(failed)} of {len(files)} files could not be read: {", ".join(failed)} '
      '(the others were predicted; replace or remove those files)'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
