"""Convolution kernels for XLA:CPU, with XLA's convolution's values and gradients.

XLA's CPU convolution (Eigen) runs well below its own matmul speed for three things PSPNet
is made of (measured per layer against PyTorch's oneDNN in ``benchmarks/conv_cpu.py``):
1x1 convolutions, the weight gradient of most 3x3 convolutions, and 3x3 convolutions with
a very wide input (the 4096-channel classifier conv). ``cpu_conv`` rewrites those as
matmuls that XLA runs at full speed; the sums are the same, so the numbers agree up to
float reassociation. Only ``pspnet_jax.ops.convolution`` calls this, and only in programs lowered
for the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pspnet_jax.ops import backend

NHWC = ('NHWC', 'HWIO', 'NHWC')


def xla_conv(x, w, strides, padding, dilation, groups=1):
  """XLA's own NHWC x HWIO convolution (``groups``: its ``feature_group_count``)."""
  return lax.conv_general_dilated(
    x,
    w,
    strides,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=NHWC,
    feature_group_count=groups,
  )


CIN_CHUNK = 1024  # XLA CPU convs with a wider input run at ~60% speed; split and sum


def split_conv(x, w, strides, padding, dilation):
  """Forward 3x3 conv, split over input channels in chunks of ``CIN_CHUNK``."""
  ci = w.shape[2]
  if ci <= CIN_CHUNK:
    return xla_conv(x, w, strides, padding, dilation)
  y = None
  for c0 in range(0, ci, CIN_CHUNK):
    part = xla_conv(
      x[..., c0 : c0 + CIN_CHUNK], w[:, :, c0 : c0 + CIN_CHUNK], strides, padding, dilation
    )
    y = part if y is None else y + part
  return y


def _tap(xp, i, j, out_hw, strides, dilation):
  """The window of padded ``xp`` that kernel tap ``(i, j)`` multiplies: [B, Ho, Wo, C]."""
  b, _, _, c = xp.shape
  (ho, wo), (sh, sw), (dh, dw_) = out_hw, strides, dilation
  return lax.slice(
    xp,
    (0, i * dh, j * dw_, 0),
    (b, i * dh + (ho - 1) * sh + 1, j * dw_ + (wo - 1) * sw + 1, c),
    (1, sh, sw, 1),
  )


def _pad(x, padding):
  (pt, pb), (pl, pr) = padding
  return jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if (pt or pb or pl or pr) else x


def _wgrad_taps(x, dy, w_shape, strides, padding, dilation):
  """dW[i, j] = x_pad[taps (i, j)]^T dy: one matmul per kernel tap (slices of x)."""
  kh, kw, ci, co = w_shape
  xp = _pad(x, padding)
  dyf = dy.reshape(-1, co)
  taps = [
    jnp.dot(
      _tap(xp, i, j, dy.shape[1:3], strides, dilation).reshape(-1, ci).T,
      dyf,
      preferred_element_type=jnp.float32,
    )
    for i in range(kh)
    for j in range(kw)
  ]
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
  shifted = [
    dyp[
      :, top + pt - i * dh : top + pt - i * dh + h, left + pl - j * dw_ : left + pl - j * dw_ + wd
    ]
    for i in range(kh)
    for j in range(kw)
  ]
  d = jnp.concatenate(shifted, axis=-1).reshape(-1, kh * kw * co)
  dw = lax.dot_general(
    x.reshape(-1, ci), d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  return dw.reshape(ci, kh, kw, co).transpose(1, 2, 0, 3)


def wgrad_strategy(x_shape, w_shape, strides) -> str:
  """Which weight gradient is fastest on CPU for this conv, from per-layer timings of
  PSPNet-50 at batch 2 x 473 on 2 cores (benchmarks/conv_cpu.py; XLA / taps / shifted, ms):

  - very wide inputs, the 4096-channel classifier: 3746 / 2409 / 1468 -> shifted;
  - large maps with few channels, the deep stem at 237x237: 934 / 244 / 646 -> taps;
  - layer4's 512-channel dilation-4 convs: 510 / 299 / 308 -> taps;
  - everything else (layer1-3, the aux head) XLA's own is as fast or faster, e.g.
    layer3 84 / 94 / 114, aux 227 / 418 / 226.

  ``conv.weight_gradient=xla|taps|shifted`` (``pspnet_jax.ops.backend``; or
  ``PSPNET_CONV_WGRAD``) forces one."""
  forced = backend.settings()['weight_gradient']
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
  return split_conv(x, w, strides, padding, dilation)


def _conv_kxk_fwd(x, w, strides, padding, dilation):
  return split_conv(x, w, strides, padding, dilation), (x, w)


def _conv_kxk_bwd(strides, padding, dilation, res, dy):
  x, w = res
  conv = functools.partial(split_conv, strides=strides, padding=padding, dilation=dilation)
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
  kernels run XLA's convolution split over wide inputs (``split_conv``) with the weight
  gradient picked by ``wgrad_strategy``.
  """
  strides, dilation = tuple(strides), tuple(dilation)
  padding = tuple(tuple(p) for p in padding)
  kh, kw, ci, co = w.shape
  if (kh, kw) == (1, 1) and not any(sum(padding, ())):
    # lax.slice, not x[:, ::s]: its output size is written (h - 1) // s + 1 as the
    # convolution's is, so the two agree under symbolic shapes (jax.export) too.
    xs = lax.slice(x, (0, 0, 0, 0), x.shape, (1, *strides, 1)) if strides != (1, 1) else x
    b, h, wd, _ = xs.shape
    return jnp.dot(xs.reshape(-1, ci), w.reshape(ci, co)).reshape(b, h, wd, co)
  return _conv_kxk(x, w, strides, padding, dilation)


# ---- depthwise convolutions (groups == channels: MobileNetV2) ---------------------------
# XLA:CPU runs a grouped convolution one group at a time: on MobileNetV2-d8's depthwise
# layers at batch 2 x 473 it is ~11x slower than PyTorch's forward and ~14x slower in the
# backward (benchmarks/conv_cpu.py --depthwise). A depthwise conv is k*k shifted copies of
# the input scaled per channel and summed, which XLA fuses into one elementwise loop; its
# gradients are the same taps: dx scatters dy back through them, dW[i, j] sums
# tap(i, j) * dy over batch and space (in float32).


def _depthwise_out_hw(x_shape, w_shape, strides, padding, dilation):
  return tuple(
    (n + lo + hi - d * (k - 1) - 1) // s + 1
    for n, (lo, hi), k, s, d in zip(x_shape[1:3], padding, w_shape[:2], strides, dilation)
  )


def _depthwise_taps(x, w, strides, padding, dilation):
  kh, kw = w.shape[:2]
  xp = _pad(x, padding)
  out_hw = _depthwise_out_hw(x.shape, w.shape, strides, padding, dilation)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(xp, i, j, out_hw, strides, dilation) * w[i, j, 0]
      y = term if y is None else y + term
  return y


def depthwise_weight_gradient(x, dy, w_shape, strides, padding, dilation):
  """dW [kh, kw, 1, C] float32 of the depthwise conv, given ``dy``: per tap, the sum over
  batch and space of ``tap(i, j) * dy``, multiplied and summed in float32."""
  kh, kw, _, c = w_shape
  xp = _pad(x, padding)
  dyf = dy.astype(jnp.float32)
  taps = [
    jnp.sum(
      _tap(xp, i, j, dy.shape[1:3], strides, dilation).astype(jnp.float32) * dyf, axis=(0, 1, 2)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  return jnp.stack(taps).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(x, w, strides, padding, dilation):
  """Depthwise NHWC x [kh, kw, 1, C] convolution (PyTorch's ``groups == in_ch == out_ch``)
  as a sum of shifted, per-channel scaled taps; XLA's grouped convolution's values and
  gradients up to float reassociation, the weight gradient accumulated in float32."""
  return _depthwise_taps(x, w, strides, padding, dilation)


def _depthwise_fwd(x, w, strides, padding, dilation):
  return _depthwise_taps(x, w, strides, padding, dilation), (x, w)


def _depthwise_bwd(strides, padding, dilation, res, dy):
  x, w = res
  (dx,) = jax.vjp(lambda x_: _depthwise_taps(x_, w, strides, padding, dilation), x)[1](dy)
  dw = depthwise_weight_gradient(x, dy, w.shape, strides, padding, dilation)
  return dx, dw.astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)
