"""Pure array functions for PSPNet on NHWC arrays: pooling, resizing, pyramid pooling.

All output sizes are static (Python ints), so every function jit-compiles to one program
per input shape. Semantics follow PyTorch exactly, because the weights we port and the
numbers we reproduce were produced by PyTorch:

- ``adaptive_avg_pool`` is ``nn.AdaptiveAvgPool2d``: bin ``i`` of ``b`` over a length ``n``
  covers ``floor(i*n/b) .. ceil((i+1)*n/b)``; bins overlap when ``b`` does not divide ``n``.
- ``resize_bilinear`` is ``F.interpolate(mode='bilinear', antialias=False)`` for both
  values of ``align_corners``, up- and down-sampling.

Both are separable, so each is applied one spatial axis at a time. Interpolation and pooling
coefficients are computed in NumPy at trace time (in float32 where PyTorch uses float32)
and enter the program as constants.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Size = int | Sequence[int]


def _pair(size: Size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


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


def _apply_along(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
  """Contracts spatial ``axis`` (1 = H, 2 = W) of NHWC ``x`` with ``matrix[out, in]``."""
  m = jnp.asarray(matrix, dtype=x.dtype)
  # HIGHEST keeps float32 exact on accelerators, whose default matmul precision is lower.
  if axis == 1:
    return jnp.einsum('oh,bhwc->bowc', m, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('ow,bhwc->bhoc', m, x, precision=jax.lax.Precision.HIGHEST)


def adaptive_avg_pool(x: jax.Array, output_size: Size) -> jax.Array:
  """PyTorch ``AdaptiveAvgPool2d``. x: [B, H, W, C] -> [B, oh, ow, C]."""
  oh, ow = _pair(output_size)
  _, h, w, _ = x.shape
  x = _apply_along(x, adaptive_pool_matrix(h, oh), axis=1)
  return _apply_along(x, adaptive_pool_matrix(w, ow), axis=2)


def linear_taps(in_size: int, out_size: int, align_corners: bool):
  """Two-tap linear interpolation along one axis, as PyTorch computes it.

  Returns ``(i0, i1, w0, w1)``: output ``j`` is ``w0[j] * x[i0[j]] + w1[j] * x[i1[j]]``.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize needs positive sizes, got {in_size} -> {out_size}')
  # PyTorch's CPU kernel: the scale is a float32, the coordinate scale * (dst + 0.5) - 0.5
  # is evaluated fused (one rounding) and stored as float32. Matching this bit for bit
  # matters: at 60 -> 473 a float64 coordinate moves taps by ~2e-6 and breaks 1e-5 parity.
  f32 = np.float32
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
    src = (np.float64(scale) * dst).astype(f32)
  else:
    scale = f32(in_size) / f32(out_size)
    src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(f32), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
  return i0, i1, f32(1) - w1, w1


def interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """[out_size, in_size] float32: the taps of ``linear_taps`` as a dense matrix."""
  i0, i1, w0, w1 = linear_taps(in_size, out_size, align_corners)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0)
  np.add.at(m, (rows, i1), w1)
  return m


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lerp_axis(x: jax.Array, in_size: int, out_size: int, axis: int,
               align_corners: bool) -> jax.Array:
  i0, i1, w0, w1 = linear_taps(in_size, out_size, align_corners)
  shape = [1, 1, 1, 1]
  shape[axis] = out_size
  w0 = jnp.asarray(w0.reshape(shape), x.dtype)
  w1 = jnp.asarray(w1.reshape(shape), x.dtype)
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def _lerp_axis_fwd(x, in_size, out_size, axis, align_corners):
  return _lerp_axis(x, in_size, out_size, axis, align_corners), None


def _lerp_axis_bwd(in_size, out_size, axis, align_corners, _, dy):
  # The adjoint of a gather is a scatter-add, which XLA runs serially on CPU (1.4 s for the
  # 60 -> 473 logits of a batch of 2 at 150 classes); as the transposed interpolation
  # matrix it is a small matmul (~0.1 s).
  m = jnp.asarray(interpolation_matrix(in_size, out_size, align_corners), dy.dtype)
  spec = 'oh,bowc->bhwc' if axis == 1 else 'ow,bhoc->bhwc'
  return (jnp.einsum(spec, m, dy, precision=jax.lax.Precision.HIGHEST),)


_lerp_axis.defvjp(_lerp_axis_fwd, _lerp_axis_bwd)


def _resize_axis(x: jax.Array, out_size: int, axis: int, align_corners: bool) -> jax.Array:
  if x.shape[axis] == out_size:
    return x  # both conventions map every output onto its own input sample
  return _lerp_axis(x, x.shape[axis], out_size, axis, align_corners)


def resize_bilinear(x: jax.Array, size: Size, align_corners: bool) -> jax.Array:
  """PyTorch ``F.interpolate(x, size, mode='bilinear', align_corners=...)`` on NHWC.

  x: [B, H, W, C] -> [B, size[0], size[1], C]. Two taps per output sample, no antialiasing
  when downsampling (as PyTorch's default), so this is also what the evaluation protocol
  uses to resize probability maps.
  """
  oh, ow = _pair(size)
  x = _resize_axis(x, oh, 1, align_corners)
  return _resize_axis(x, ow, 2, align_corners)


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


def conv_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric padding ``dilation * (k - 1) // 2`` on both spatial axes."""
  p = dilation * (kernel_size - 1) // 2
  return (p, p), (p, p)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` (the ResNet stem's): pads with -inf."""
  # A Python -inf init lets JAX recognise reduce_window_max (which has a gradient).
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))

