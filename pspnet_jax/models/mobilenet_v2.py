"""Dilated MobileNetV2 backbone (Sandler et al., CVPR 2018), as mmsegmentation builds it for
its ``mobilenet-v2-d8`` PSPNet / FCN / DeepLab configs.

mmseg's ``MobileNetV2`` (``mmseg/models/backbones/mobilenet_v2.py``, widen factor 1.0):
``conv1`` (3x3 stride 2, 32 channels, BN, ReLU6), then ``layer1..layer7`` of inverted
residual blocks with (expand ratio, channels, blocks) = (1,16,1) (6,24,2) (6,32,3) (6,64,4)
(6,96,3) (6,160,3) (6,320,1). The d8 configs set strides (1,2,2,1,1,1,1) and dilations
(1,1,1,2,2,4,4): output stride 8. As in mmseg's ``make_layer``, stride *and dilation* apply
to the first block of a layer only; its other blocks are undilated 3x3 depthwise convs.
``out_indices=(1, 2, 4, 6)``: the outputs of layer2, layer3, layer5 and layer7
(24/32/96/320 channels); PSPNet's head reads layer7, its auxiliary head layer5.

Inverted residual block (mmseg ``InvertedResidual``): ``conv`` is a Sequential of
ConvModules (conv without bias, BN): 1x1 expansion + ReLU6 (absent at expand ratio 1),
3x3 depthwise (stride, dilation) + ReLU6, 1x1 linear projection (no activation); the input
is added when stride is 1 and the width is unchanged.

Attribute names are mmseg's state-dict names without ``backbone.``: ``conv1.{conv,bn}``,
``layer{1-7}.{j}.conv.{k}.{conv,bn}``, so ``pspnet_jax.port.mapping``'s one rule
(``kernel`` <-> ``weight``) maps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax.errors import UserError
from pspnet_jax.models.layers import BatchNorm, conv2d

# (expand ratio, output channels, blocks) of layer1..layer7, widen factor 1.0.
ARCH = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
STEM_CHANNELS = 32
# mmseg's mobilenet-v2-d8 configs: (strides, dilations) of layer1..layer7.
GEOMETRY = {8: ((1, 2, 2, 1, 1, 1, 1), (1, 1, 1, 2, 2, 4, 4))}
OUT_INDICES = (1, 2, 4, 6)


class ConvModule(nnx.Module):
  """mmcv's ConvModule with a norm: ``conv`` (no bias) then ``bn``; the caller activates."""

  def __init__(self, in_ch, out_ch, kernel_size, *, stride=1, dilation=1, groups=1, dtype, rngs):
    self.conv = conv2d(
      in_ch,
      out_ch,
      kernel_size,
      stride=stride,
      dilation=dilation,
      groups=groups,
      dtype=dtype,
      rngs=rngs,
    )
    self.bn = BatchNorm(out_ch)

  def __call__(self, x):
    return self.bn(self.conv(x))


class InvertedResidual(nnx.Module):
  def __init__(self, in_ch, out_ch, stride, expand_ratio, dilation, *, dtype, rngs):
    hidden = int(round(in_ch * expand_ratio))
    self.use_res_connect = stride == 1 and in_ch == out_ch
    layers = []
    if expand_ratio != 1:
      layers.append(ConvModule(in_ch, hidden, 1, dtype=dtype, rngs=rngs))
    layers.append(
      ConvModule(
        hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, dtype=dtype, rngs=rngs
      )
    )
    layers.append(ConvModule(hidden, out_ch, 1, dtype=dtype, rngs=rngs))
    self.conv = nnx.List(layers)

  def __call__(self, x):
    y = x
    for layer in self.conv[:-1]:
      y = jax.nn.relu6(layer(y))
    y = self.conv[-1](y)  # linear bottleneck: no activation
    return x + y if self.use_res_connect else y


class MobileNetV2(nnx.Module):
  """``__call__(x)`` returns the outputs of layer2, layer3, layer5, layer7.

  x: [B, H, W, 3] -> 4 arrays [B, h_i, w_i, C_i], C = ``out_channels`` = (24, 32, 96, 320),
  at strides 4, 8, 8, 8 for output stride 8.
  """

  def __init__(self, *, output_stride: int = 8, dtype=jnp.float32, rngs: nnx.Rngs):
    if output_stride not in GEOMETRY:
      raise UserError(
        f'MobileNetV2 is built at output stride {sorted(GEOMETRY)} (mmseg '
        f'mobilenet-v2-d8), got output_stride={output_stride}'
      )
    strides, dilations = GEOMETRY[output_stride]
    self.dtype = dtype
    self.conv1 = ConvModule(3, STEM_CHANNELS, 3, stride=2, dtype=dtype, rngs=rngs)
    in_ch = STEM_CHANNELS
    for k, ((expand, channels, blocks), stride, dilation) in enumerate(
      zip(ARCH, strides, dilations)
    ):
      layer = []
      for i in range(blocks):
        layer.append(
          InvertedResidual(
            in_ch,
            channels,
            stride if i == 0 else 1,
            expand,
            dilation if i == 0 else 1,
            dtype=dtype,
            rngs=rngs,
          )
        )
        in_ch = channels
      setattr(self, f'layer{k + 1}', nnx.List(layer))
    self.out_channels = tuple(ARCH[i][1] for i in OUT_INDICES)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = jax.nn.relu6(self.conv1(x.astype(self.dtype)))
    feats = []
    for k in range(len(ARCH)):
      for block in getattr(self, f'layer{k + 1}'):
        x = block(x)
      if k in OUT_INDICES:
        feats.append(x)
    return feats
