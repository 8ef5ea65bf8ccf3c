"""The convolution every model layer runs: XLA's own, or the CPU kernels of
``pspnet_jax.ops.cpu_conv`` in programs lowered for the CPU; in mixed precision, with
float32 weights and weight gradients around low-precision compute.

The choice is ``jax.lax.platform_dependent``'s, made when a program is lowered, by the
platform it is lowered *for*, not by the host that traces it: a train step compiled ahead
of time for a TPU, or exported for a GPU, on a CPU host holds XLA's plain convolutions
only (tested in ``tests/test_train_step.py``). A program lowered for one platform holds one
branch, so the compiler never sees a conditional. ``conv.backend=xla`` (``pspnet_jax.ops.
backend``, read at trace time; or ``PSPNET_CONV=xla``) selects XLA's convolution on every
platform.

Mixed precision (``conv(x_bf16, w_f32)``): the weights are cast to the input's dtype for
the forward and input-gradient convolutions, and the weight gradient is a convolution of
``x`` with the output gradient that accumulates in float32 and returns float32
(``preferred_element_type``). That convolution is where the batch is summed, so with the
batch sharded over devices XLA's all-reduce of weight gradients is float32, and the
gradient reaches the float32 weights without a round trip through bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pspnet_jax.ops import backend, cpu_conv

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv_padding(kernel_size: int, dilation: int = 1) -> Padding:
  """PyTorch's symmetric padding ``dilation * (k - 1) // 2`` on both spatial axes."""
  p = dilation * (kernel_size - 1) // 2
  return (p, p), (p, p)


def conv(
  x: jax.Array,
  w: jax.Array,
  strides=(1, 1),
  padding: Padding = ((0, 0), (0, 0)),
  dilation=(1, 1),
  groups: int = 1,
) -> jax.Array:
  """x: [B, H, W, Cin], w: [kh, kw, Cin / groups, Cout] -> [B, H', W', Cout]; differentiable.

  XLA's convolution on GPU/TPU; when lowered for the CPU (unless ``conv.backend=xla``)
  ``cpu_conv.cpu_conv`` for ``groups=1`` and ``cpu_conv.depthwise_conv`` for depthwise
  convolutions (``groups == Cin == Cout``), with the same values and gradients up to float
  reassociation; other grouped convolutions are XLA's everywhere. With ``w`` in a wider
  dtype than ``x`` (float32 weights, bfloat16 compute) the output has ``x``'s dtype and the
  weight gradient ``w``'s, accumulated in float32.
  """
  strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
  padding = tuple((int(a), int(b)) for a, b in padding)
  if w.dtype != x.dtype:
    return _mixed_precision_conv(x, w, strides, padding, dilation, int(groups))
  return _same_dtype_conv(x, w, strides, padding, dilation, int(groups))


def _xla_only() -> bool:
  """``conv.backend=xla``: XLA's convolutions on every platform (read at trace time)."""
  return backend.settings()['backend'] == 'xla'


def _depthwise(w_shape, groups):
  """``groups == Cin == Cout``: one input channel per group, one output per input."""
  return groups > 1 and w_shape[2] == 1 and w_shape[3] == groups


def _same_dtype_conv(x, w, strides, padding, dilation, groups=1):
  def plain(x, w):
    return cpu_conv.xla_conv(x, w, strides, padding, dilation, groups)

  if _xla_only() or (groups > 1 and not _depthwise(w.shape, groups)):
    return plain(x, w)

  def fast(x, w):
    if groups > 1:
      return cpu_conv.depthwise_conv(x, w, strides, padding, dilation)
    return cpu_conv.cpu_conv(x, w, strides, padding, dilation)

  return lax.platform_dependent(x, w, cpu=fast, default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _mixed_precision_conv(x, w, strides, padding, dilation, groups):
  return _same_dtype_conv(x, w.astype(x.dtype), strides, padding, dilation, groups)


def _mixed_precision_fwd(x, w, strides, padding, dilation, groups):
  return _mixed_precision_conv(x, w, strides, padding, dilation, groups), (x, w)


def _mixed_precision_bwd(strides, padding, dilation, groups, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(
    lambda x_: _same_dtype_conv(x_, w.astype(x.dtype), strides, padding, dilation, groups), x
  )
  (dx,) = input_vjp(dy)
  dw = weight_gradient(x, dy, w.shape[:2], strides, padding, dilation, groups)
  return dx, dw.astype(w.dtype)


_mixed_precision_conv.defvjp(_mixed_precision_fwd, _mixed_precision_bwd)


def weight_gradient(
  x: jax.Array, dy: jax.Array, kernel_size, strides, padding, dilation, groups: int = 1
) -> jax.Array:
  """dL/dW [kh, kw, Cin / groups, Cout] float32 of the NHWC x HWIO convolution
  ``y = conv(x, w)``, given ``dy = dL/dy``: one convolution that slides ``dy`` over ``x``
  (the batch is its contracted feature axis, ``Cin`` its batch axis, split into ``groups``
  batch groups; the forward stride becomes the kernel dilation and the forward dilation the
  stride), accumulating in float32. Depthwise ones lowered for the CPU sum the taps instead
  (``cpu_conv.depthwise_weight_gradient``).

  dW[i, j, c, o] = sum over n, p, q of x_pad[n, p*s + i*d, q*s + j*d, c] * dy[n, p, q, o].
  """
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
  (top, bottom), (left, right) = padding
  _, h, wd, cin = x.shape
  _, oh, ow, cout = dy.shape
  # Pad (or crop, when the forward never reached the last rows) so the output is kh x kw.
  bottom = (kh - 1) * dh + (oh - 1) * sh + 1 - h - top
  right = (kw - 1) * dw + (ow - 1) * sw + 1 - wd - left

  def plain(x, dy):
    return lax.conv_general_dilated(
      x,
      dy,
      window_strides=(dh, dw),
      padding=((top, bottom), (left, right)),
      rhs_dilation=(sh, sw),
      dimension_numbers=('CHWN', 'IHWO', 'HWNC'),
      batch_group_count=groups,
      preferred_element_type=jnp.float32,
    )

  w_shape = (kh, kw, cin // groups, cout)
  if _xla_only() or not _depthwise(w_shape, groups):
    return plain(x, dy)

  def fast(x, dy):
    return cpu_conv.depthwise_weight_gradient(x, dy, w_shape, strides, padding, dilation)

  return lax.platform_dependent(x, dy, cpu=fast, default=plain)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  out_sharding=None,
):
  """``lax.conv_general_dilated``'s signature (``nnx.Conv(conv_general_dilated=...)``):
  NHWC x HWIO convolutions with explicit padding, plain or grouped, go through ``conv``;
  anything else (input-dilated, other layouts) is XLA's convolution as asked."""
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, cpu_conv.NHWC)
  simple = (
    lhs.ndim == 4
    and not isinstance(padding, str)
    and batch_group_count == 1
    and tuple(lhs_dilation or (1, 1)) == (1, 1)
    and (
      dimension_numbers is None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
    )
    and precision is None
    and preferred_element_type is None
    and out_sharding is None
  )
  if not simple:
    return lax.conv_general_dilated(
      lhs,
      rhs.astype(lhs.dtype),
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
      out_sharding=out_sharding,
    )
  return conv(lhs, rhs, window_strides, padding, rhs_dilation or (1, 1), feature_group_count)
