"""Layers with PyTorch semantics: BatchNorm2d, and a Conv2d with PyTorch's padding that
runs ``pspnet_jax.ops.conv`` (XLA's convolution, or CPU kernels when lowered for the CPU).

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

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax import ops
from pspnet_jax.ops import convolution

# Initialisation as semseg's model has it (hszhao/semseg at 4f274c3f): its ResNet
# (model/resnet.py, torchvision's rule) sets every convolution to kaiming_normal_(mode=
# 'fan_out', nonlinearity='relu') and every BN to weight 1, bias 0; the layers PSPNet adds
# (ppm, cls, aux in model/pspnet.py) keep nn.Conv2d's own default, kaiming_uniform_(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and a bias from the same range. BN's default is
# weight 1, bias 0 everywhere.
INITS = ('resnet', 'pytorch_default')
he_normal_fan_out = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
pytorch_default_kernel = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def pytorch_default_bias(fan_in: int):
  """nn.Conv2d's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in * k * k."""
  bound = fan_in**-0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nnx.Module):
  """``nn.BatchNorm2d`` on NHWC: eps 1e-5, momentum 0.1 (Flax convention: 0.9).

  Statistics and affine parameters are float32 whatever the compute dtype; the output has
  the input's dtype.
  """

  def __init__(
    self,
    num_features: int,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    use_running_average: bool = False,
  ):
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
    if x.dtype == a.dtype:
      return x * a + b
    return _scale_shift(x, a, b)


@jax.custom_vjp
def _scale_shift(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """x * a + b in x's (low) dtype, with the gradients of the float32 per-channel a and b
  summed over the batch in float32: under a sharded batch those sums are the cross-device
  all-reduces, which then run in float32."""
  return x * a.astype(x.dtype) + b.astype(x.dtype)


def _scale_shift_fwd(x, a, b):
  return _scale_shift(x, a, b), (x, a)


def _scale_shift_bwd(residuals, dy):
  x, a = residuals
  axes = tuple(range(x.ndim - 1))
  dyf = dy.astype(jnp.float32)
  return (dy * a.astype(dy.dtype), jnp.sum(dyf * x.astype(jnp.float32), axes), jnp.sum(dyf, axes))


_scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def _compute_dtype_input(args, /, *, dtype=None, inexact=True):
  """``nnx.Conv``'s dtype promotion for mixed precision: the input in the compute dtype,
  kernel and bias left float32. ``ops.conv`` casts the kernel for the forward and returns
  its gradient in float32 (see ``pspnet_jax.ops.convolution``)."""
  del inexact
  inputs, kernel, bias = args
  return (inputs if dtype is None else jnp.asarray(inputs, dtype)), kernel, bias


def conv2d(
  in_ch: int,
  out_ch: int,
  kernel_size: int,
  *,
  stride: int = 1,
  dilation: int = 1,
  groups: int = 1,
  bias: bool = False,
  init: str = 'resnet',
  dtype=jnp.float32,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """``nn.Conv2d`` with PyTorch's explicit symmetric padding ``dilation * (k - 1) // 2``.

  ``init``: ``'resnet'`` (He normal, fan out: the backbone) or ``'pytorch_default'``
  (``nn.Conv2d``'s own: PSPNet's new layers); see ``INITS`` above.

  Never 'SAME': at stride 2 'SAME' pads asymmetrically and shifts every feature map by
  half a pixel relative to PyTorch. Parameters are float32; with ``dtype=bfloat16`` the
  convolution computes in bfloat16 and the weight gradient comes back float32.
  ``groups``: PyTorch's ``groups`` (``groups == in_ch``: depthwise); the kernel is then
  [k, k, in_ch / groups, out_ch], PyTorch's [out_ch, in_ch / groups, k, k] transposed.
  """
  if init not in INITS:
    raise ValueError(f'init must be one of {INITS}, got {init!r}')
  fan_in = in_ch // groups * kernel_size * kernel_size
  kernel_init = he_normal_fan_out if init == 'resnet' else pytorch_default_kernel
  bias_init = pytorch_default_bias(fan_in) if init == 'pytorch_default' else nnx.initializers.zeros
  return nnx.Conv(
    in_ch,
    out_ch,
    (kernel_size, kernel_size),
    strides=stride,
    padding=ops.conv_padding(kernel_size, dilation),
    kernel_dilation=dilation,
    feature_group_count=groups,
    use_bias=bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
    conv_general_dilated=convolution.conv_general_dilated,
    promote_dtype=_compute_dtype_input,
    rngs=rngs,
  )
