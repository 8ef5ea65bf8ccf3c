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


# --- Convolutions on CPU --------------------------------------------------------------------
# XLA's CPU convolution (Eigen) runs well below its own matmul speed for three things PSPNet
# is made of (measured per layer against PyTorch's oneDNN in benchmarks/conv_cpu.py):
# 1x1 convolutions, the weight gradient of most 3x3 convolutions, and 3x3 convolutions
# with a very wide input (the 4096-channel classifier conv). `cpu_conv` rewrites those as
# matmuls that XLA runs at full speed; the sums are the same, so the numbers agree up to
# float reassociation. GPUs and TPUs keep XLA's convolution unchanged.

CIN_CHUNK = 1024  # XLA CPU convs with a wider input run at ~60% speed; split and sum


def _split_conv(x, w, strides, padding, dilation):
  """Forward 3x3 conv, split over input channels in chunks of ``CIN_CHUNK``."""
  ci = w.shape[2]
  if ci <= CIN_CHUNK:
    return _conv(x, w, strides, padding, dilation)
  y = None
  for c0 in range(0, ci, CIN_CHUNK):
    part = _conv(x[..., c0:c0 + CIN_CHUNK], w[:, :, c0:c0 + CIN_CHUNK], strides, padding, dilation)
    y = part if y is None else y + part
  return y


def _wgrad_taps(x, dy, w_shape, strides, padding, dilation):
  """dW[i, j] = x_pad[taps (i, j)]^T dy: one matmul per kernel tap (slices of x)."""
  kh, kw, ci, co = w_shape
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
  return jnp.stack(taps).reshape(kh, kw, ci, co)


def _wgrad_shifted(x, dy, w_shape, padding, dilation):
  """Stride 1: dW = x^T [dy shifted by each tap]: one matmul against k*k shifted copies of
  dy (the narrower tensor) instead of k*k slices of x."""
  kh, kw, ci, co = w_shape
  (pt, _), (pl, _) = padding
  dh, dw_ = dilation
  b, h, wd, _ = x.shape
  _, ho, wo, _ = dy.shape
  top, left = (kh - 1) * dh, (kw - 1) * dw_
  dyp = jnp.pad(dy, ((0, 0), (top, max(0, h + pt - ho)), (left, max(0, wd + pl - wo)), (0, 0)))
  shifted = [dyp[:, top + pt - i * dh:top + pt - i * dh + h, left + pl - j * dw_:left + pl - j * dw_ + wd]
             for i in range(kh) for j in range(kw)]
  d = jnp.concatenate(shifted, axis=-1).reshape(-1, kh * kw * co)
  dw = lax.dot_general(x.reshape(-1, ci), d, (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return dw.reshape(ci, kh, kw, co).transpose(1, 2, 0, 3)


def wgrad_strategy(x_shape, w_shape, strides) -> str:
  """Which weight gradient is fastest on CPU for this conv, from per-layer timings of
  PSPNet-50 at batch 2 x 473 on 2 cores (benchmarks/conv_cpu.py; XLA / taps / shifted, ms):

  - very wide inputs, the 4096-channel classifier: 3746 / 2409 / 1468 -> shifted;
  - large maps with few channels, the deep stem at 237x237: 934 / 244 / 646 -> taps;
  - layer4's 512-channel dilation-4 convs: 510 / 299 / 308 -> taps;
  - everything else (layer1-3, the aux head) XLA's own is as fast or faster, e.g.
    layer3 84 / 94 / 114, aux 227 / 418 / 226.

  ``PSPNET_CONV_WGRAD=xla|taps|shifted`` forces one, for benchmarking."""
  forced = os.environ.get('PSPNET_CONV_WGRAD', 'auto')
  if forced != 'auto':
    return 'taps' if forced == 'shifted' and strides != (1, 1) else forced
  _, h, wd, _ = x_shape
  _, _, ci, _ = w_shape
  if strides != (1, 1):
    return 'xla'
  if ci >= 2048:
    return 'shifted'
  if h * wd >= 150 * 150 or ci == 512:
    return 'taps'
  return 'xla'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_kxk(x, w, strides, padding, dilation):
  return _split_conv(x, w, strides, padding, dilation)


def _conv_kxk_fwd(x, w, strides, padding, dilation):
  return _split_conv(x, w, strides, padding, dilation), (x, w)


def _conv_kxk_bwd(strides, padding, dilation, res, dy):
  x, w = res
  conv = functools.partial(_split_conv, strides=strides, padding=padding, dilation=dilation)
  strategy = wgrad_strategy(x.shape, w.shape, strides)
  if strategy == 'xla':
    return jax.vjp(conv, x, w)[1](dy)
  (dx,) = jax.vjp(lambda x_: conv(x_, w), x)[1](dy)
  if strategy == 'shifted':
    dw = _wgrad_shifted(x, dy, w.shape, padding, dilation)
  else:
    dw = _wgrad_taps(x, dy, w.shape, strides, padding, dilation)
  return dx, dw.astype(w.dtype)


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def cpu_conv(x, w, strides, padding, dilation):
  """NHWC x HWIO convolution, fast on XLA:CPU, with XLA's convolution's values and
  gradients (up to float reassociation).

  1x1 convolutions are a (strided) slice and a matmul, differentiated as such; larger
  kernels run XLA's convolution split over wide inputs (``_split_conv``) with the weight
  gradient picked by ``wgrad_strategy``.
  """
  strides, dilation = tuple(strides), tuple(dilation)
  padding = tuple(tuple(p) for p in padding)
  kh, kw, ci, co = w.shape
  if (kh, kw) == (1, 1) and not any(sum(padding, ())):
    xs = x[:, ::strides[0], ::strides[1]] if strides != (1, 1) else x
    b, h, wd, _ = xs.shape
    return jnp.dot(xs.reshape(-1, ci), w.reshape(ci, co)).reshape(b, h, wd, co)
  return _conv_kxk(x, w, strides, padding, dilation)


def _cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, precision=None, **unused):
  """``lax.conv_general_dilated``'s signature (what ``nnx.Conv`` calls) for NHWC convs."""
  del lhs_dilation, dimension_numbers, feature_group_count, precision, unused
  return cpu_conv(lhs, rhs, window_strides, padding, rhs_dilation or (1, 1))


def use_cpu_conv() -> bool:
  """On the CPU backend, unless ``PSPNET_CONV=xla`` asks for XLA's plain convolution."""
  if os.environ.get('PSPNET_CONV', 'auto') == 'xla':
    return False
  return jax.default_backend() == 'cpu'


def conv2d(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
           bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """``nn.Conv2d`` with PyTorch's explicit symmetric padding ``dilation * (k - 1) // 2``.

  Never 'SAME': at stride 2 'SAME' pads asymmetrically and shifts every feature map by
  half a pixel relative to PyTorch.
  """
  extra = {}
  if use_cpu_conv():
    extra['conv_general_dilated'] = _cpu_conv_general_dilated
  return nnx.Conv(
      in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
      padding=ops.conv_padding(kernel_size, dilation), kernel_dilation=dilation,
      use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=he_normal_fan_out, rngs=rngs, **extra)
