"""Pooling on NHWC arrays, as PyTorch computes it: adaptive average pooling, the pyramid
pooling of PSPNet, and the ResNet stem's max pool.

``adaptive_avg_pool`` is ``nn.AdaptiveAvgPool2d``: bin ``i`` of ``b`` over a length ``n``
covers ``floor(i*n/b) .. ceil((i+1)*n/b)``; bins overlap when ``b`` does not divide ``n``.
It is separable, so it is applied one spatial axis at a time, with the bin matrix computed
in NumPy at trace time.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspnet_jax.ops.resize import Size, apply_along, pair, resize_bilinear


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 matrix whose row ``i`` averages bin ``i`` (PyTorch rule)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'adaptive pooling needs positive sizes, got {in_size} -> {out_size}')
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i+1)*in/out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: Size) -> jax.Array:
  """PyTorch ``AdaptiveAvgPool2d``. x: [B, H, W, C] -> [B, oh, ow, C]."""
  oh, ow = pair(output_size)
  _, h, w, _ = x.shape
  x = apply_along(x, adaptive_pool_matrix(h, oh), axis=1)
  return apply_along(x, adaptive_pool_matrix(w, ow), axis=2)


def pyramid_pool(
    x: jax.Array,
    bins: Sequence[int],
    branch: Callable[[int, jax.Array], jax.Array],
    align_corners: bool = True,
) -> jax.Array:
  """Pyramid pooling (Zhao et al. 2017, Sec. 3.2) as a function.

  For each ``bins[i]``: pool ``x`` to ``bin x bin``, apply ``branch(i, pooled)`` (PSPNet: a
  1x1 conv, BN and ReLU), resize back to ``x``'s size, and concatenate on channels in the
  reference order ``[x, branch_0, branch_1, ...]``.

  x: [B, H, W, C] -> [B, H, W, C + sum of branch channels].
  """
  h, w = x.shape[1:3]
  outs = [x]
  for i, b in enumerate(bins):
    y = branch(i, adaptive_avg_pool(x, b))
    outs.append(resize_bilinear(y, (h, w), align_corners).astype(x.dtype))
  return jnp.concatenate(outs, axis=-1)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` (the ResNet stem's): pads with -inf."""
  # A Python -inf init lets JAX recognise reduce_window_max (which has a gradient).
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))
