"""Layers with PyTorch semantics: BatchNorm2d and a Conv2d with PyTorch's padding.

Flax's own ``BatchNorm`` updates its running variance with the *biased* batch variance;
PyTorch uses the unbiased one (``n / (n - 1)``). Ported checkpoints and fine-tuning must
behave as in PyTorch, so this module keeps its own BatchNorm. Its parameter names are
PyTorch's (``weight``, ``bias``, ``running_mean``, ``running_var``) so the weight mapping in
``pspnet_jax.port`` is one rule.

Batch statistics are reductions over the batch axis; under ``jax.jit`` with the batch
sharded over a device mesh they are the statistics of the *global* batch, i.e. synchronised
BN comes from the sharding, not from collectives written here.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pspnet_jax import ops

# PyTorch's default init for the ResNet convs (kaiming_normal_, fan_out, relu).
he_normal_fan_out = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BatchNorm(nnx.Module):
  """``nn.BatchNorm2d`` on NHWC: eps 1e-5, momentum 0.1 (Flax convention: 0.9).

  Statistics and affine parameters are float32 whatever the compute dtype; the output has
  the input's dtype.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               use_running_average: bool = False):
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C], normalised over every axis but the last."""
    if self.use_running_average:
      mean, var = self.running_mean[...], self.running_var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass: no cancellation
      n = x.size // x.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.running_mean[...] = m * self.running_mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
      self.running_var[...] = m * self.running_var[...] + (1 - m) * jax.lax.stop_gradient(unbiased)
    # Folded affine, as PyTorch's CPU kernel computes it: y = x * a + (bias - mean * a).
    a = self.weight[...] * jax.lax.rsqrt(var + self.epsilon)
    b = self.bias[...] - mean * a
    return (x * a.astype(x.dtype) + b.astype(x.dtype)).astype(x.dtype)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, strides, padding, dilation):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_wgrad(x, w, strides, padding, dilation):
  """A convolution whose weight gradient is computed as one matmul per kernel tap.

  Forward and input gradient are XLA's. The weight gradient
  ``dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i*d, w*s + j*d, :]^T dy[b, h, w, :]`` is
  ``k*k`` matmuls over (batch x space): on CPU, XLA's own weight-gradient convolution runs
  2-4x slower than that for the 1x1 and wide 3x3 convolutions that dominate PSPNet
  (benchmarks/train_step.py measures it). Same sum, so the same numbers up to float
  reassociation.
  """
  return _conv(x, w, strides, padding, dilation)


def _conv_fwd(x, w, strides, padding, dilation):
  return _conv(x, w, strides, padding, dilation), (x, w)


def _conv_bwd(strides, padding, dilation, res, dy):
  x, w = res
  _, x_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding, dilation), x)
  (dx,) = x_vjp(dy)
  kh, kw, ci, co = w.shape
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if (pt or pb or pl or pr) else x
  b, ho, wo, _ = dy.shape
  (sh, sw), (dh, dw_) = strides, dilation
  dyf = dy.reshape(-1, co)
  taps = []
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i * dh, j * dw_, 0),
                      (b, i * dh + (ho - 1) * sh + 1, j * dw_ + (wo - 1) * sw + 1, ci),
                      (1, sh, sw, 1))
      taps.append(jnp.dot(tap.reshape(-1, ci).T, dyf, preferred_element_type=jnp.float32))
  dw = jnp.stack(taps).reshape(kh, kw, ci, co).astype(w.dtype)
  return dx, dw


conv_matmul_wgrad.defvjp(_conv_fwd, _conv_bwd)


def _matmul_wgrad_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                       rhs_dilation=None, dimension_numbers=None,
                                       feature_group_count=1, precision=None, **unused):
  """``lax.conv_general_dilated``'s signature (what ``nnx.Conv`` calls) for NHWC convs."""
  del lhs_dilation, dimension_numbers, feature_group_count, precision, unused
  return conv_matmul_wgrad(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                           tuple(rhs_dilation or (1, 1)))


def use_matmul_wgrad(kernel_size: int, in_ch: int, stride: int) -> bool:
  """Where the tap-matmul weight gradient beats XLA's on CPU (measured): 1x1 convs, and
  stride-1 3x3 convs with >= 256 input channels (layer3/4, the heads). On GPU/TPU the
  vendor convolution kernels are used unchanged. ``PSPNET_CONV_WGRAD=xla`` (or ``matmul``)
  overrides the choice, for benchmarking."""
  forced = os.environ.get('PSPNET_CONV_WGRAD', 'auto')
  if forced != 'auto':
    return forced == 'matmul'
  if jax.default_backend() != 'cpu':
    return False
  return kernel_size == 1 or (stride == 1 and in_ch >= 256)


def conv2d(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
           bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """``nn.Conv2d`` with PyTorch's explicit symmetric padding ``dilation * (k - 1) // 2``.

  Never 'SAME': at stride 2 'SAME' pads asymmetrically and shifts every feature map by
  half a pixel relative to PyTorch.
  """
  extra = {}
  if use_matmul_wgrad(kernel_size, in_ch, stride):
    extra['conv_general_dilated'] = _matmul_wgrad_conv_general_dilated
  return nnx.Conv(
      in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
      padding=ops.conv_padding(kernel_size, dilation), kernel_dilation=dilation,
      use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=he_normal_fan_out, rngs=rngs, **extra)
