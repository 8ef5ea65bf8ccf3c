"""Bilinear resizing on NHWC arrays, and the one definition of linear-interpolation taps.

``resize_bilinear`` is PyTorch's ``F.interpolate(mode='bilinear', antialias=False)`` for
both values of ``align_corners``, up- and down-sampling: the network's own resizes (ported
weights were trained with PyTorch's). ``linear_taps`` also gives OpenCV's
``cv2.resize(..., INTER_LINEAR)`` sampling (``convention='opencv'``), which semseg's test
protocol uses outside the network (``pspnet_jax.evaluation.protocol``).

Resizing is separable, so it is applied one spatial axis at a time. For static sizes the
taps are computed in NumPy at trace time and enter the program as constants. For symbolic
sizes (a program exported with ``jax.export`` for any height and width) the same formulas
run in the program, in float32 (see ``linear_taps``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Size = int | Sequence[int]
CONVENTIONS = ('pytorch', 'opencv')


def is_static(*sizes) -> bool:
  """Whether every size is a concrete integer (not a ``jax.export`` symbolic dimension)."""
  return all(isinstance(s, (int, np.integer)) for s in sizes)


def _size(d):
  return int(d) if is_static(d) else d


def pair(size: Size) -> tuple[int, int]:
  if is_static(size):
    return int(size), int(size)
  h, w = size
  return _size(h), _size(w)


def apply_along(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
  """Contracts spatial ``axis`` (1 = H, 2 = W) of NHWC ``x`` with ``matrix[out, in]``."""
  m = jnp.asarray(matrix, dtype=x.dtype)
  # HIGHEST keeps float32 exact on accelerators, whose default matmul precision is lower.
  if axis == 1:
    return jnp.einsum('oh,bhwc->bowc', m, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('ow,bhwc->bhoc', m, x, precision=jax.lax.Precision.HIGHEST)


def linear_taps(
  in_size: int, out_size: int, align_corners: bool = False, convention: str = 'pytorch'
):
  """Two-tap linear interpolation along one axis.

  Returns ``(i0, i1, w0, w1)`` (int64 indices, float32 weights): output ``j`` is
  ``w0[j] * x[i0[j]] + w1[j] * x[i1[j]]``.

  ``convention='pytorch'``: PyTorch's CPU kernel. The scale is a float32 and the source
  coordinate ``scale * (dst + 0.5) - 0.5`` (``scale * dst`` with ``align_corners``) is
  evaluated fused (one rounding) and stored as a float32. Matching this bit for bit
  matters: at 60 -> 473 a float64 coordinate moves taps by ~2e-6 and breaks 1e-5 parity.
  Coordinates below 0 are clamped to 0; at the last sample PyTorch keeps both weights on
  that one sample.

  ``convention='opencv'``: ``cv2.resize(..., INTER_LINEAR)`` on float images (half-pixel
  centres only, so ``align_corners`` must be False). The coordinate is
  ``(dst + 0.5) * (1 / (out / in)) - 0.5`` in double precision (checked against
  ``cv2.resize`` to 1e-5 relative; PyTorch's float32 scale moves values by up to 0.012 grey
  levels at 512 -> 683). Coordinates before the first or at/after the last sample take that
  sample whole (``w1 = 0``).

  With a symbolic size (``jax.export``) the taps are computed in the program as float32
  (int32 indices) by the same formulas; the one difference is that the half-pixel
  coordinate may be rounded twice instead of once (at most one float32 ulp of the
  coordinate, ~1e-7 relative in the weights).
  """
  if not is_static(in_size, out_size):
    return _symbolic_linear_taps(in_size, out_size, align_corners, convention)
  if in_size < 1 or out_size < 1:
    raise ValueError(f'resize needs positive sizes, got {in_size} -> {out_size}')
  if convention not in CONVENTIONS:
    raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
  f32 = np.float32
  dst = np.arange(out_size, dtype=np.float64)
  if convention == 'opencv':
    if align_corners:
      raise ValueError("OpenCV's INTER_LINEAR has no align_corners=True")
    src = (dst + 0.5) * (1.0 / (float(out_size) / in_size)) - 0.5
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0).astype(f32)
    frac[(i0 < 0) | (i0 >= in_size - 1)] = 0
  else:
    if align_corners:
      scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
      src = (np.float64(scale) * dst).astype(f32)
    else:
      scale = f32(in_size) / f32(out_size)
      src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(f32), f32(0))
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0.astype(f32)
  i0 = np.clip(i0, 0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(frac, f32(0), f32(1)).astype(f32)
  return i0, i1, (f32(1) - w1).astype(f32), w1


def _symbolic_linear_taps(in_size, out_size, align_corners, convention):
  if convention != 'pytorch':
    raise ValueError(
      f'symbolic sizes are supported for the pytorch convention only, got {convention!r}'
    )
  f32 = jnp.float32
  n, m = jnp.asarray(in_size, f32), jnp.asarray(out_size, f32)
  dst = jax.lax.iota(f32, out_size)
  if align_corners:
    src = jnp.where(m > 1, (n - 1) / jnp.maximum(m - 1, 1), f32(0)) * dst
  else:
    src = jnp.maximum((n / m) * (dst + 0.5) - 0.5, f32(0))
  i0 = jnp.floor(src).astype(jnp.int32)
  frac = src - i0.astype(f32)
  i0 = jnp.clip(i0, 0, in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = jnp.clip(frac, 0, 1)
  return i0, i1, 1 - w1, w1


def interpolation_matrix(
  in_size: int, out_size: int, align_corners: bool, convention: str = 'pytorch'
) -> np.ndarray:
  """[out_size, in_size] float32: the taps of ``linear_taps`` as a dense matrix (a traced
  array when a size is symbolic)."""
  i0, i1, w0, w1 = linear_taps(in_size, out_size, align_corners, convention)
  if not is_static(in_size, out_size):
    cols = jnp.expand_dims(jax.lax.iota(jnp.int32, in_size), 0)
    return (
      jnp.where(cols == i0[:, None], w0[:, None], 0)
      + jnp.where(cols == i1[:, None], w1[:, None], 0)
    ).astype(jnp.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0)
  np.add.at(m, (rows, i1), w1)
  return m


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lerp_axis(
  x: jax.Array, in_size: int, out_size: int, axis: int, align_corners: bool
) -> jax.Array:
  i0, i1, w0, w1 = linear_taps(in_size, out_size, align_corners)
  shape = [1, 1, 1, 1]
  shape[axis] = out_size
  w0 = jnp.asarray(w0, x.dtype).reshape(shape)
  w1 = jnp.asarray(w1, x.dtype).reshape(shape)
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
  if x.shape[axis] == out_size:  # with symbolic sizes: when provably equal
    return x  # both conventions map every output onto its own input sample
  return _lerp_axis(x, x.shape[axis], out_size, axis, align_corners)


def resize_bilinear(x: jax.Array, size: Size, align_corners: bool) -> jax.Array:
  """PyTorch ``F.interpolate(x, size, mode='bilinear', align_corners=...)`` on NHWC.

  x: [B, H, W, C] -> [B, size[0], size[1], C]. Two taps per output sample, no antialiasing
  when downsampling (PyTorch's default). Differentiable; the gradient is the transposed
  interpolation matrix.
  """
  oh, ow = pair(size)
  x = _resize_axis(x, oh, 1, align_corners)
  return _resize_axis(x, ow, 2, align_corners)
