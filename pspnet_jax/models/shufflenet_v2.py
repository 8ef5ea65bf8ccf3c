"""Dilated ShuffleNetV2 backbone (Ma et al., "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design", ECCV 2018), as torchvision builds it
(``torchvision/models/shufflenetv2.py``, pytorch/vision at v0.20.0), dilated to output
stride 8 for PSPNet.

torchvision's network: ``conv1`` (3x3 stride 2, 24 channels, BN, ReLU), a 3x3 stride-2 max
pool, ``stage2..stage4`` of 4, 8, 4 units, ``conv5`` (1x1 to 1024 or 2048 channels, BN,
ReLU), then the ImageNet classifier (not built here). Widths (``stages_out_channels``) per
``width_mult``: ``WIDTHS``.

A unit (torchvision ``InvertedResidual``): the first unit of a stage has two branches on the
whole input, ``branch1`` (3x3 depthwise BN, 1x1 conv BN ReLU) and ``branch2`` (1x1 conv BN
ReLU, 3x3 depthwise BN, 1x1 conv BN ReLU), each to half the output channels; the other
units split the channels in two, keep the first half and pass the second through
``branch2``. Both concatenate and shuffle the channels in two groups.

Dilation: output stride 8 removes the stride of the first units of stage3 and stage4 and
dilates every 3x3 depthwise conv of stage3 by 2 and of stage4 by 4 (``GEOMETRY``), as
semseg dilates every block of ResNet's layer3 / layer4 (``contract_dilation=False``), so
that every ImageNet kernel after a removed stride samples at its trained spacing. mmseg's
MobileNetV2 (``pspnet_jax.models.mobilenet_v2``) dilates only the first block of a layer;
this backbone does not copy that. The first unit of a stride-1 stage keeps its two branches.

Outputs, as MobileNetV2's four: the max pool's (stride 4), stage2 (8), stage3 (8) and
conv5 (8, after stage4). PSPNet's head reads conv5, its auxiliary head stage3 (the stage
before the last, as MobileNetV2's layer5).

Attribute names are torchvision's state-dict names (``conv1.{0,1}``,
``stage{2-4}.{j}.branch1.{0-3}``, ``stage{2-4}.{j}.branch2.{0,1,3,4,5,6}``, ``conv5.{0,1}``),
so ``pspnet_jax.port.mapping``'s one rule (``kernel`` <-> ``weight``) maps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax import ops
from pspnet_jax.errors import UserError
from pspnet_jax.models.layers import BatchNorm, conv2d

STAGES_REPEATS = (4, 8, 4)
# torchvision's stages_out_channels: conv1, stage2, stage3, stage4, conv5.
WIDTHS = {
  0.5: (24, 48, 96, 192, 1024),
  1.0: (24, 116, 232, 464, 1024),
  1.5: (24, 176, 352, 704, 1024),
  2.0: (24, 244, 488, 976, 2048),
}
# output stride -> (strides, dilations) of stage2..stage4.
GEOMETRY = {8: ((2, 1, 1), (1, 2, 4)), 16: ((2, 2, 1), (1, 1, 2)), 32: ((2, 2, 2), (1, 1, 1))}


def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """x: [B, H, W, C] -> [B, H, W, C], channel ``g * (C / groups) + i`` moved to
  ``i * groups + g`` (torchvision's ``channel_shuffle`` on NCHW)."""
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


def _conv_bn(layers: dict, index: int, in_ch, out_ch, kernel_size, *, dtype, rngs, **conv):
  """``layers[str(index)]``: a conv without bias, ``layers[str(index + 1)]`` its BN."""
  layers[str(index)] = conv2d(in_ch, out_ch, kernel_size, dtype=dtype, rngs=rngs, **conv)
  layers[str(index + 1)] = BatchNorm(out_ch)


def _apply(layers: nnx.Dict, index: int, x: jax.Array) -> jax.Array:
  return layers[str(index + 1)](layers[str(index)](x))


class ShuffleUnit(nnx.Module):
  """torchvision's ``InvertedResidual``; ``split=False``: the two-branch first unit."""

  def __init__(self, in_ch, out_ch, *, split, stride, dilation, dtype, rngs):
    half = out_ch // 2
    self.split = split
    dw = dict(stride=stride, dilation=dilation, dtype=dtype, rngs=rngs)
    if not split:
      branch1 = {}
      _conv_bn(branch1, 0, in_ch, in_ch, 3, groups=in_ch, **dw)
      _conv_bn(branch1, 2, in_ch, half, 1, dtype=dtype, rngs=rngs)
      self.branch1 = nnx.Dict(branch1)
    branch2 = {}
    _conv_bn(branch2, 0, half if split else in_ch, half, 1, dtype=dtype, rngs=rngs)
    _conv_bn(branch2, 3, half, half, 3, groups=half, **dw)
    _conv_bn(branch2, 5, half, half, 1, dtype=dtype, rngs=rngs)
    self.branch2 = nnx.Dict(branch2)

  def _branch2(self, x):
    x = jax.nn.relu(_apply(self.branch2, 0, x))
    return jax.nn.relu(_apply(self.branch2, 5, _apply(self.branch2, 3, x)))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.split:
      keep, x = jnp.split(x, 2, axis=-1)
    else:
      keep = jax.nn.relu(_apply(self.branch1, 2, _apply(self.branch1, 0, x)))
    return channel_shuffle(jnp.concatenate([keep, self._branch2(x)], axis=-1))


class ShuffleNetV2(nnx.Module):
  """``__call__(x)`` returns the outputs of the max pool, stage2, stage3 and conv5.

  x: [B, H, W, 3] -> 4 arrays [B, h_i, w_i, C_i], C = ``out_channels`` (x1.0: 24, 116, 232,
  1024), at strides 4, 8, 8, 8 for output stride 8.
  """

  def __init__(
    self,
    *,
    width_mult: float = 1.0,
    output_stride: int = 8,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if width_mult not in WIDTHS:
      raise UserError(
        f'ShuffleNetV2 comes in widths {sorted(WIDTHS)} (torchvision shufflenet_v2_x*), '
        f'got width_mult={width_mult}'
      )
    if output_stride not in GEOMETRY:
      raise UserError(
        f'ShuffleNetV2 is built at output stride {sorted(GEOMETRY)}, got output_stride='
        f'{output_stride}'
      )
    widths = WIDTHS[width_mult]
    strides, dilations = GEOMETRY[output_stride]
    self.dtype = dtype
    conv1 = {}
    _conv_bn(conv1, 0, 3, widths[0], 3, stride=2, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Dict(conv1)
    in_ch = widths[0]
    for k, (repeats, out_ch, stride, dilation) in enumerate(
      zip(STAGES_REPEATS, widths[1:4], strides, dilations)
    ):
      units = [
        ShuffleUnit(
          in_ch if j == 0 else out_ch,
          out_ch,
          split=j > 0,
          stride=stride if j == 0 else 1,
          dilation=dilation,
          dtype=dtype,
          rngs=rngs,
        )
        for j in range(repeats)
      ]
      setattr(self, f'stage{k + 2}', nnx.List(units))
      in_ch = out_ch
    conv5 = {}
    _conv_bn(conv5, 0, in_ch, widths[4], 1, dtype=dtype, rngs=rngs)
    self.conv5 = nnx.Dict(conv5)
    self.out_channels = (widths[0], widths[1], widths[2], widths[4])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = jax.nn.relu(_apply(self.conv1, 0, x.astype(self.dtype)))
    feats = [ops.max_pool_3x3_s2(x)]
    x = feats[0]
    for k in range(len(STAGES_REPEATS)):
      for unit in getattr(self, f'stage{k + 2}'):
        x = unit(x)
      feats.append(x)
    feats[-1] = jax.nn.relu(_apply(self.conv5, 0, x))
    return feats
