"""Pooling on NHWC arrays, as PyTorch computes it: adaptive average pooling, the pyramid
pooling of PSPNet, and the ResNet stem's max pool.

``adaptive_avg_pool`` is ``nn.AdaptiveAvgPool2d``: bin ``i`` of ``b`` over a length ``n``
covers ``floor(i*n/b) .. ceil((i+1)*n/b)``; bins overlap when ``b`` does not divide ``n``.
It is separable, so it is applied one spatial axis at a time, with the bin matrix computed
in NumPy at trace time (in the program when the input size is a ``jax.export`` symbolic
dimension).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pspnet_jax.ops.resize import Size, apply_along, is_static, pair, resize_bilinear


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float64 matrix whose row ``i`` averages bin ``i`` (PyTorch rule);
  a float32 traced array when ``in_size`` is symbolic."""
  if not is_static(in_size):
    i = jnp.expand_dims(jax.lax.iota(jnp.int32, out_size), 1)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    cols = jnp.expand_dims(jax.lax.iota(jnp.int32, in_size), 0)
    inside = (cols >= start) & (cols < end)
    return jnp.where(inside, 1 / (end - start).astype(jnp.float32), 0)
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


def _reduce_window_max_3x3_s2(x: jax.Array) -> jax.Array:
  # A Python -inf init lets JAX recognise reduce_window_max (which has a gradient).
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` (the ResNet stem's): pads with -inf.

  x: [B, H, W, C] -> [B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]. The value is the maximum
  of the nine strided taps of the padded input, which ONNX converters map to elementwise
  ``Max`` (jax2onnx turns a 4-D ``reduce_window`` into a MaxPool with a 4-D kernel, which
  onnxruntime refuses). A maximum is exact, so this is ``reduce_window``'s value bit for bit;
  the gradient is ``reduce_window``'s own (to the first maximum of each window, as PyTorch),
  not the maximum's (which would split ties, common after a ReLU).
  """
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c),
                          (1, 2, 2, 1))
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def _max_pool_fwd(x):
  return max_pool_3x3_s2(x), x


def _max_pool_bwd(x, dy):
  return jax.vjp(_reduce_window_max_3x3_s2, x)[1](dy)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
