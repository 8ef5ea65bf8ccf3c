"""Smoke run of the model alone: segment a built-in synthetic image with a *randomly
initialised* PSPNet-50 and report shapes and timings. The predicted classes are
meaningless (no training has happened); this shows the jit-compiled forward works here.

  python -m pspnet_jax.demo [--size 473] [--depth 50]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import errors
from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.normalize import normalize


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
  """[size, size, 3] uint8: a textured background with a disc and a rectangle."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  img = rng.uniform(0, 40, (size, size, 3)) + np.stack([xx, yy, xx + yy], -1) * 60 / size
  disc = (yy - size * 0.4) ** 2 + (xx - size * 0.35) ** 2 < (size * 0.2) ** 2
  img[disc] = (220, 40, 40)
  img[int(size * 0.6) : int(size * 0.9), int(size * 0.5) : int(size * 0.85)] = (40, 200, 60)
  return img.clip(0, 255).astype(np.uint8)


@errors.command
def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--size', type=errors.int_at_least(8), default=473)
  ap.add_argument('--depth', type=int, choices=(18, 34, 50, 101, 152), default=50)
  ap.add_argument('--classes', type=errors.int_at_least(1), default=150)
  args = ap.parse_args(argv)

  model = PSPNet(PSPNetConfig(depth=args.depth, num_classes=args.classes), rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, x):
    return jnp.argmax(nnx.merge(graphdef, state)(x), -1)

  img = synthetic_image(args.size)
  x = jnp.asarray(normalize(img)[None])
  t = time.perf_counter()
  compiled = predict.lower(state, x).compile()
  compile_s = time.perf_counter() - t
  compiled(state, x).block_until_ready()
  t = time.perf_counter()
  pred = compiled(state, x).block_until_ready()
  forward_s = time.perf_counter() - t
  print('PSPNet smoke run: RANDOMLY INITIALISED weights, so the classes predicted are noise.')
  print(
    f'  model        PSPNet-{args.depth}, {args.classes} classes, '
    f'{sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6:.1f}M parameters'
  )
  print(f'  device       {jax.devices()[0].platform} x{jax.device_count()}')
  print(f'  input        {tuple(x.shape)} (synthetic image, normalised)')
  print(
    f'  prediction   {tuple(pred.shape)} {pred.dtype}, {len(np.unique(np.asarray(pred)))} distinct classes'
  )
  print(f'  compile      {compile_s:.2f} s')
  print(f'  forward      {forward_s:.3f} s (after one warm-up run)')


if __name__ == '__main__':
  main()
