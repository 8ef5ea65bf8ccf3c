"""Pooling on NHWC arrays, as PyTorch (and Caffe) compute it: adaptive average pooling, the
pyramid pooling of PSPNet, the ResNet stem's max pool, and Caffe's fixed-window average pool.

``adaptive_avg_pool`` is ``nn.AdaptiveAvgPool2d``: bin ``i`` of ``b`` over a length ``n``
covers ``floor(i*n/b) .. ceil((i+1)*n/b)``; bins overlap when ``b`` does not divide ``n``.
``avg_pool_ceil`` is the authors' Caffe pyramid pooling (``Pooling`` ``pool: AVE`` with
``kernel_size = stride = k`` and no padding, ``pooling_layer.cpp`` of hszhao/PSPNet): windows
of ``k`` from 0, the output size rounded up, the last window clipped to the input and
averaged over what it covers. On an ``n = b * k`` input both are the same ``b`` bins.
Both are separable, so they are applied one spatial axis at a time, with the bin matrix
computed in NumPy at trace time (in the program when the input size is a ``jax.export``
symbolic dimension).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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


def ceil_pool_matrix(in_size: int, kernel: int) -> np.ndarray:
  """[ceil(in_size / kernel), in_size] float64 matrix whose row ``i`` averages
  ``i*kernel .. min((i+1)*kernel, in_size)`` (Caffe's AVE pooling, stride = kernel, no
  padding); a float32 traced array when ``in_size`` is symbolic."""
  if kernel < 1:
    raise ValueError(f'pooling needs a positive kernel, got {kernel}')
  if not is_static(in_size):
    out_size = (in_size + kernel - 1) // kernel
    i = jnp.expand_dims(jax.lax.iota(jnp.int32, out_size), 1)
    start = i * kernel
    end = jnp.minimum(start + kernel, in_size)
    cols = jnp.expand_dims(jax.lax.iota(jnp.int32, in_size), 0)
    inside = (cols >= start) & (cols < end)
    return jnp.where(inside, 1 / (end - start).astype(jnp.float32), 0)
  if in_size < 1:
    raise ValueError(f'pooling needs a positive size, got {in_size}')
  out_size = -(-in_size // kernel)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start, end = i * kernel, min((i + 1) * kernel, in_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def avg_pool_ceil(x: jax.Array, kernel: int) -> jax.Array:
  """Caffe's ``AVE`` pooling with ``kernel_size = stride = kernel``, no padding.

  x: [B, H, W, C] -> [B, ceil(H / kernel), ceil(W / kernel), C].
  """
  _, h, w, _ = x.shape
  x = apply_along(x, ceil_pool_matrix(h, kernel), axis=1)
  return apply_along(x, ceil_pool_matrix(w, kernel), axis=2)


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
  fixed_size: int = 0,
) -> jax.Array:
  """Pyramid pooling (Zhao et al. 2017, Sec. 3.2) as a function.

  For each ``bins[i]``: pool ``x`` to ``bin x bin``, apply ``branch(i, pooled)`` (PSPNet: a
  1x1 conv, BN and ReLU), resize back to ``x``'s size, and concatenate on channels in the
  reference order ``[x, branch_0, branch_1, ...]``.

  fixed_size: 0 pools adaptively (semseg); ``N > 0`` pools as the Caffe release does, with
  fixed windows of ``N // bin`` (``avg_pool_ceil``), sized for ``N x N`` features: the same
  bins on ``N x N`` features, ``ceil(H / (N // bin))`` of them on others.

  x: [B, H, W, C] -> [B, H, W, C + sum of branch channels].
  """
  h, w = x.shape[1:3]
  outs = [x]
  for i, b in enumerate(bins):
    pooled = avg_pool_ceil(x, fixed_size // b) if fixed_size else adaptive_avg_pool(x, b)
    y = branch(i, pooled)
    outs.append(resize_bilinear(y, (h, w), align_corners).astype(x.dtype))
  return jnp.concatenate(outs, axis=-1)


def _stem_padding(ceil_mode: bool) -> tuple[int, int]:
  # Rounding the output size up adds a window at the end exactly when (H - 1) is odd; one
  # more row of -inf gives it, and changes nothing when (H - 1) is even.
  return (1, 2) if ceil_mode else (1, 1)


def _reduce_window_max_3x3_s2(x: jax.Array, ceil_mode: bool) -> jax.Array:
  # A Python -inf init lets JAX recognise reduce_window_max (which has a gradient).
  pad = _stem_padding(ceil_mode)
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), pad, pad, (0, 0))
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3_s2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
  """PyTorch ``MaxPool2d(3, stride=2, padding=1, ceil_mode=...)`` (the ResNet stem's): pads
  with -inf. ``ceil_mode`` rounds the output size up, as Caffe's pooling always does
  (``pooling_layer.cpp`` of hszhao/PSPNet; its last window still starts inside the image).

  x: [B, H, W, C] -> [B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C], or with ``ceil_mode``
  [B, H // 2 + 1, W // 2 + 1, C] (the same for odd sizes). The value is the maximum
  of the nine strided taps of the padded input, which ONNX converters map to elementwise
  ``Max`` (jax2onnx turns a 4-D ``reduce_window`` into a MaxPool with a 4-D kernel, which
  onnxruntime refuses). A maximum is exact, so this is ``reduce_window``'s value bit for bit;
  the gradient is ``reduce_window``'s own (to the first maximum of each window, as PyTorch),
  not the maximum's (which would split ties, common after a ReLU).
  """
  b, h, w, c = x.shape
  if ceil_mode:
    ho, wo = h // 2 + 1, w // 2 + 1
  else:
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  pad = _stem_padding(ceil_mode)
  xp = jnp.pad(x, ((0, 0), pad, pad, (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      tap = jax.lax.slice(
        xp, (0, i, j, 0), (b, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c), (1, 2, 2, 1)
      )
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def _max_pool_fwd(x, ceil_mode):
  return max_pool_3x3_s2(x, ceil_mode), x


def _max_pool_bwd(ceil_mode, x, dy):
  return jax.vjp(lambda v: _reduce_window_max_3x3_s2(v, ceil_mode), x)[1](dy)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
