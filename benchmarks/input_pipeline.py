"""Throughput of the training input pipeline: augmented 473x473 images per second.

  .venv/bin/python benchmarks/input_pipeline.py [--workers 0 1 2] [--steps 20]

Prepares a segmentation_folder dataset of ADE20K-sized images (JPEG 512x683, the median
ADE20K shape; textured synthetic content) in a temporary directory, then reports
  1. the per-image time of each stage (read+decode, scale, rotate, blur, flip, mmseg's
     crop, photometric distortion, normalise) in one thread with OpenCV single-threaded:
     where a worker's time goes;
  2. end-to-end img/s of train_loader at batch 8 for each --workers value (0 = the main
     process with one background thread), and per worker, without and with the
     photometric distortion (augment.photometric).
"""

import argparse
import dataclasses
import itertools
import os
import tempfile
import time

import cv2
import numpy as np

from pspnet_jax import data
from pspnet_jax.data import transforms
from pspnet_jax.data.builders import synthetic_shapes
from pspnet_jax.normalize import normalize


def make_folder(root: str, n: int, h: int = 512, w: int = 683):
  """n JPEG images h x w with 4-class PNG labels, laid out for segmentation_folder."""
  os.makedirs(f'{root}/images/train')
  os.makedirs(f'{root}/labels/train')
  with open(f'{root}/classes.json', 'w') as f:
    f.write('["background", "circle", "square", "triangle"]')
  for i in range(n):
    image, label = synthetic_shapes.make_example(0, 0, i, 128)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    noise = np.random.default_rng(i).normal(0, 12, image.shape)  # JPEG-realistic entropy
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    cv2.imwrite(
      f'{root}/images/train/{i:04d}.jpg',
      cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
      [cv2.IMWRITE_JPEG_QUALITY, 90],
    )
    cv2.imwrite(f'{root}/labels/train/{i:04d}.png', label)


def stage_profile(source, config: data.AugmentConfig, n: int) -> dict[str, float]:
  """Mean CPU seconds per image of each augmentation stage, in semseg's order.

  CPU time (not wall time) because the development machine is shared: it is what one
  worker costs when it has a core to itself.
  """
  times = dict.fromkeys(
    [
      'read+decode',
      'to float32',
      'scale',
      'rotate',
      'blur',
      'flip',
      'photometric',
      'crop',
      'normalise',
    ],
    0.0,
  )
  for i in range(n):
    rng = transforms.example_rng(0, 0, i)
    t = time.process_time()

    def lap(name):
      nonlocal t
      now = time.process_time()
      times[name] += now - t
      t = now

    ex = source[i % len(source)]
    lap('read+decode')
    image, label = ex['image'].astype(np.float32), ex['label']
    lap('to float32')
    image, label = transforms.random_scale(image, label, rng, config.scale_min, config.scale_max)
    lap('scale')
    image, label = transforms.random_rotate(
      image, label, rng, config.rotate_min, config.rotate_max, config.ignore_label
    )
    lap('rotate')
    image = transforms.random_gaussian_blur(image, rng)
    lap('blur')
    image, label = transforms.random_hflip(image, label, rng)
    lap('flip')
    image, label = transforms.random_crop(image, label, rng, config.crop_size)
    lap('crop')
    image = transforms.photometric_distortion(
      np.clip(np.rint(image), 0, 255).astype(np.uint8), rng
    ).astype(np.float32)
    lap('photometric')
    normalize(np.ascontiguousarray(image)), label.astype(np.int32)
    lap('normalise')
  return {k: v / n for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--steps', type=int, default=12, help='timed batches per setting')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--images', type=int, default=48)
  args = parser.parse_args()
  cv2.setNumThreads(1)  # per-worker figures: one core's worth of OpenCV
  config = data.AugmentConfig(crop_size=473)
  with tempfile.TemporaryDirectory() as tmp:
    make_folder(f'{tmp}/raw', args.images)
    data.prepare('segmentation_folder', f'{tmp}/prepared', root=f'{tmp}/raw')
    source = data.eval_source('segmentation_folder', 'train', f'{tmp}/prepared')

    profile = stage_profile(source, config, 3 * args.images // 2)
    total = sum(profile.values())
    print(f'one thread, CPU time per image per stage (ms), {os.cpu_count()} cores on this machine:')
    for k, v in profile.items():
      print(f'  {k:12s} {1e3 * v:7.2f}  {100 * v / total:5.1f}%')
    print(f'  {"total":12s} {1e3 * total:7.2f}  -> {1 / total:.1f} img/s per worker')

    for photometric, workers in itertools.product((False, True), args.workers):
      loader = data.train_loader(
        'segmentation_folder',
        'train',
        f'{tmp}/prepared',
        global_batch_size=args.batch,
        augment=dataclasses.replace(config, photometric=photometric),
        seed=0,
        process_index=0,
        process_count=1,
        worker_count=workers,
      )
      next(loader)  # start-up (worker spawn) and the first batch are not timed
      t = time.perf_counter()
      for _ in range(args.steps):
        next(loader)
      dt = time.perf_counter() - t
      loader.close()
      rate = args.steps * args.batch / dt
      per = rate / max(workers, 1)
      print(
        f'train_loader photometric={photometric} workers={workers}: {rate:.1f} img/s '
        f'({per:.1f} per worker)'
      )


if __name__ == '__main__':
  main()
