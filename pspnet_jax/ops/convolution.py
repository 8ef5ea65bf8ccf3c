"""The convolution every model layer runs: XLA's own, or the CPU kernels of
``pspnet_jax.ops.cpu_conv`` in programs lowered for the CPU.

The choice is ``jax.lax.platform_dependent``'s, made when a program is lowered, by the
platform it is lowered *for*, not by the host that traces it: a train step compiled ahead
of time for a TPU, or exported for a GPU, on a CPU host holds XLA's plain convolutions
only (tested in ``tests/test_train_step.py``). A program lowered for one platform holds one
branch, so the compiler never sees a conditional. ``PSPNET_CONV=xla`` (read at trace time)
selects XLA's convolution on every platform, for benchmarks.
"""

from __future__ import annotations

import os

import jax
from jax import lax

from pspnet_jax.ops import cpu_conv

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv_padding(kernel_size: int, dilation: int = 1) -> Padding:
  """PyTorch's symmetric padding ``dilation * (k - 1) // 2`` on both spatial axes."""
  p = dilation * (kernel_size - 1) // 2
  return (p, p), (p, p)


def conv(x: jax.Array, w: jax.Array, strides=(1, 1), padding: Padding = ((0, 0), (0, 0)),
         dilation=(1, 1)) -> jax.Array:
  """x: [B, H, W, Cin], w: [kh, kw, Cin, Cout] -> [B, H', W', Cout]; differentiable.

  XLA's convolution on GPU/TPU; ``cpu_conv.cpu_conv`` (same values and gradients up to
  float reassociation) when lowered for the CPU, unless ``PSPNET_CONV=xla``.
  """
  strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
  padding = tuple((int(a), int(b)) for a, b in padding)

  def plain(x, w):
    return cpu_conv.xla_conv(x, w, strides, padding, dilation)

  if os.environ.get('PSPNET_CONV', 'auto') == 'xla':
    return plain(x, w)

  def fast(x, w):
    return cpu_conv.cpu_conv(x, w, strides, padding, dilation)

  return lax.platform_dependent(x, w, cpu=fast, default=plain)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """``lax.conv_general_dilated``'s signature (``nnx.Conv(conv_general_dilated=...)``):
  NHWC x HWIO convolutions with explicit padding go through ``conv``; anything else
  (grouped, input-dilated, other layouts) is XLA's convolution as asked."""
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, cpu_conv.NHWC)
  simple = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1
            and batch_group_count == 1 and tuple(lhs_dilation or (1, 1)) == (1, 1)
            and (dimension_numbers is None or lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, dimension_numbers) == nhwc)
            and precision is None and preferred_element_type is None and out_sharding is None)
  if not simple:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        out_sharding=out_sharding)
  return conv(lhs, rhs, window_strides, padding, rhs_dilation or (1, 1))
