"""Evaluation throughput: the compiled evaluator against semseg's loop in PyTorch, same
weights, same images, one process.

  python benchmarks/eval.py                      # PSPNet-50, 150 classes, 2 images 512x683
  python benchmarks/eval.py --images 4 --torch-multi-images 2 --modes whole,single,multi

Modes (all with flip, base size 512, crop 473, as semseg's ADE20K test):
  whole   the resized image (long side 512) in one forward
  single  sliding window, scale 1.0
  multi   sliding window, scales 0.5 .. 1.75

The PyTorch side is semseg's ``tool/test.py`` protocol as written there: one window at a
time (as a batch of 2 with its flip), probabilities accumulated in float64 NumPy, resized
with ``cv2.resize`` (in channel chunks: OpenCV 5 refuses 150 channels at once; F.interpolate
when OpenCV is absent). Its multi-scale run takes ~50 s an image on a 2-core CPU, so it runs
on ``--torch-multi-images`` images only (default 1).

JAX times exclude compilation (a first call compiles; ``compile_s`` is its extra time).
JAX and PyTorch alternate image by image and the speed-up is the median per-image ratio, so
load from other processes on a shared machine hits both sides alike. Prints one JSON line
per mode and a summary line.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), '..')
)  # run from a checkout, installed or not
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from torch_reference import TorchPSPNet, randomize, state_dict_numpy  # noqa: E402

from pspnet_jax.evaluation import MULTI_SCALES, EvalConfig, Evaluator, resized_size  # noqa: E402
from pspnet_jax.models import PSPNet, PSPNetConfig  # noqa: E402
from pspnet_jax.normalize import MEAN, STD  # noqa: E402
from pspnet_jax.port import load_state_dict  # noqa: E402

try:
  import cv2
except ImportError:  # the protocol's resizes then run through torch
  cv2 = None


def resize_linear(a: np.ndarray, h: int, w: int) -> np.ndarray:
  """[H, W, C] -> [h, w, C], INTER_LINEAR (half-pixel, no antialiasing)."""
  if cv2 is not None:
    chunks = [
      cv2.resize(a[..., i : i + 128], (w, h), interpolation=cv2.INTER_LINEAR)
      for i in range(0, a.shape[-1], 128)
    ]
    return np.concatenate([c.reshape(h, w, -1) for c in chunks], axis=-1)
  t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
  return (
    F.interpolate(t, (h, w), mode='bilinear', align_corners=False)[0].numpy().transpose(1, 2, 0)
  )


def torch_net_process(model, window):
  """semseg ``net_process``: window [h, w, 3] float 0-255 -> [h, w, C] flip-averaged softmax."""
  x = torch.from_numpy(((window - MEAN) / STD).astype(np.float32).transpose(2, 0, 1))[None]
  x = torch.cat([x, x.flip(3)], 0)
  with torch.no_grad():
    p = F.softmax(model(x), dim=1)
  return ((p[0] + p[1].flip(2)) / 2).numpy().transpose(1, 2, 0)


def torch_protocol(
  model, image, classes, scales, crop, base_size, whole, stride_rate=2 / 3, whole_multiple=64
):
  h, w, _ = image.shape
  image = image.astype(np.float32)
  prediction = np.zeros((h, w, classes))
  for scale in scales:
    long_size = round(scale * base_size)
    nh, nw = resized_size(h, w, long_size)
    scaled = resize_linear(image, nh, nw)
    if whole:  # the evaluator's whole mode: pad the short side to a multiple of 64
      ch = min(-(-nh // whole_multiple) * whole_multiple, max(nh, long_size))
      cw = min(-(-nw // whole_multiple) * whole_multiple, max(nw, long_size))
    else:
      ch = cw = crop
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    top, left = ph // 2, pw // 2
    padded = np.empty((nh + ph, nw + pw, 3), np.float32)
    padded[:] = MEAN
    padded[top : top + nh, left : left + nw] = scaled
    H, W = padded.shape[:2]
    sh, sw = (ch, cw) if whole else (int(math.ceil(crop * stride_rate)),) * 2
    acc = np.zeros((H, W, classes))
    cnt = np.zeros((H, W))
    for i in range(int(math.ceil((H - ch) / sh) + 1)):
      for j in range(int(math.ceil((W - cw) / sw) + 1)):
        y1, x1 = min(i * sh + ch, H), min(j * sw + cw, W)
        y0, x0 = y1 - ch, x1 - cw
        acc[y0:y1, x0:x1] += torch_net_process(model, padded[y0:y1, x0:x1])
        cnt[y0:y1, x0:x1] += 1
    acc /= cnt[..., None]
    prediction += resize_linear(acc[top : top + nh, left : left + nw], h, w)
  return prediction / len(scales)


MODES = {
  'whole': dict(mode='whole', scales=(1.0,)),
  'single': dict(mode='slide', scales=(1.0,)),
  'multi': dict(mode='slide', scales=MULTI_SCALES),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=50)
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--height', type=int, default=512)
  ap.add_argument('--width', type=int, default=683)
  ap.add_argument('--images', type=int, default=2)
  ap.add_argument('--torch-multi-images', type=int, default=1)
  ap.add_argument('--modes', default='whole,single,multi')
  ap.add_argument('--no-torch', action='store_true', help='JAX only (e.g. on an accelerator)')
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())

  ref = randomize(TorchPSPNet(num_classes=args.classes, depth=args.depth))
  model = PSPNet(PSPNetConfig(depth=args.depth, num_classes=args.classes), rngs=nnx.Rngs(0))
  load_state_dict(model, state_dict_numpy(ref))
  rng = np.random.default_rng(0)
  # Smooth random images (upsampled noise), so predictions are not pure texture noise.
  small = rng.integers(
    0, 256, (args.images, args.height // 16 + 1, args.width // 16 + 1, 3)
  ).astype(np.float32)
  images = [
    np.clip(resize_linear(s, args.height, args.width), 0, 255).astype(np.uint8) for s in small
  ]

  summary = {}
  for name in args.modes.split(','):
    cfg = EvalConfig(flip=True, base_size=512, crop_size=473, **MODES[name])
    ev = Evaluator(model, cfg)
    t = time.perf_counter()
    ev.probabilities(images[0])
    first_s = time.perf_counter() - t
    n_torch = (
      0
      if args.no_torch
      else (min(len(images), args.torch_multi_images) if name == 'multi' else len(images))
    )
    # JAX and PyTorch alternate image by image, so both see the same (shared) machine
    # state; the speed-up is the median of the per-image ratios.
    jax_times, torch_times, diffs, agree = [], [], [], []
    for i, image in enumerate(images):
      t = time.perf_counter()
      probs = ev.probabilities(image)
      jax_times.append(time.perf_counter() - t)
      if i < n_torch:
        t = time.perf_counter()
        ref_probs = torch_protocol(
          ref, image, args.classes, cfg.scales, 473, 512, whole=name == 'whole'
        )
        torch_times.append(time.perf_counter() - t)
        diffs.append(float(np.abs(probs - ref_probs).max()))
        agree.append(float(np.mean(probs.argmax(-1) == ref_probs.argmax(-1))))
    jax_s = statistics.median(jax_times)
    row = {
      'mode': name,
      'scales': list(cfg.scales),
      'flip': True,
      'image': [args.height, args.width],
      'model': f'PSPNet-{args.depth}/{args.classes}',
      'device': str(jax.devices()[0]),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'jax_images': len(images),
      'jax_s_per_image': round(jax_s, 3),
      'jax_images_per_second': round(1 / jax_s, 4),
      'compile_s': round(first_s - jax_times[0], 2),
      'compilations': ev.compilations,
    }
    if torch_times:
      ratios = [tt / jt for tt, jt in zip(torch_times, jax_times)]
      torch_s = statistics.median(torch_times)
      row.update(
        torch_images=len(torch_times),
        torch_s_per_image=round(torch_s, 3),
        torch_images_per_second=round(1 / torch_s, 4),
        speedup_jax_over_torch=round(statistics.median(ratios), 3),
        per_image_speedups=[round(r, 3) for r in ratios],
        max_prob_diff=max(diffs),
        argmax_agreement=float(np.mean(agree)),
      )
      summary[name] = row['speedup_jax_over_torch']
    print(json.dumps(row), flush=True)
  if summary:
    print(json.dumps({'speedup_jax_over_torch': summary}))


if __name__ == '__main__':
  main()
