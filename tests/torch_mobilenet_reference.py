"""An independent PyTorch MobileNetV2-PSPNet in mmsegmentation's state-dict layout, for
parity tests.

Written from the MobileNetV2 paper (Sandler et al., CVPR 2018) and mmsegmentation's
``mmseg/models/backbones/mobilenet_v2.py``, ``mmseg/models/utils/inverted_residual.py``,
``mmseg/models/decode_heads/psp_head.py`` / ``fcn_head.py`` and the
``mobilenet-v2-d8_pspnet`` configs (open-mmlab/mmsegmentation at commit 02e04cc2), not from
pspnet_jax, which it never imports. Its ``state_dict()`` has mmseg's key names
(``backbone.conv1.conv.weight``, ``backbone.layer4.0.conv.1.bn.running_var``,
``decode_head.psp_modules.0.1.conv.weight``, ``auxiliary_head.convs.0.bn.bias``, ...), so
saving it as ``{'meta', 'state_dict'}`` is an mmseg checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SETTINGS = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
D8_STRIDES = (1, 2, 2, 1, 1, 1, 1)
D8_DILATIONS = (1, 1, 1, 2, 2, 4, 4)


class ConvBN(nn.Module):
  """mmcv ConvModule(norm=BN): keys ``conv.weight``, ``bn.*``; activation optional."""

  def __init__(self, cin, cout, k, stride=1, dilation=1, groups=1, act=None):
    super().__init__()
    pad = dilation * (k - 1) // 2
    self.conv = nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.act = act

  def forward(self, x):
    x = self.bn(self.conv(x))
    return x if self.act is None else self.act(x)


class Block(nn.Module):
  def __init__(self, cin, cout, stride, expand, dilation):
    super().__init__()
    hid = int(round(cin * expand))
    self.residual = stride == 1 and cin == cout
    mods = [ConvBN(cin, hid, 1, act=nn.ReLU6())] if expand != 1 else []
    mods += [
      ConvBN(hid, hid, 3, stride, dilation, groups=hid, act=nn.ReLU6()),
      ConvBN(hid, cout, 1),
    ]
    self.conv = nn.Sequential(*mods)

  def forward(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


class TorchMobileNetV2(nn.Module):
  """Returns the outputs of layer2, layer3, layer5, layer7 (mmseg out_indices (1, 2, 4, 6))."""

  def __init__(self, strides=D8_STRIDES, dilations=D8_DILATIONS):
    super().__init__()
    self.conv1 = ConvBN(3, 32, 3, stride=2, act=nn.ReLU6())
    cin = 32
    for i, ((t, c, n), s, d) in enumerate(zip(SETTINGS, strides, dilations)):
      blocks = []
      for j in range(n):
        # mmseg's make_layer: stride and dilation on the first block only.
        blocks.append(Block(cin, c, s if j == 0 else 1, t, d if j == 0 else 1))
        cin = c
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))

  def forward(self, x):
    x = self.conv1(x)
    outs = []
    for i in range(7):
      x = getattr(self, f'layer{i + 1}')(x)
      if i in (1, 2, 4, 6):
        outs.append(x)
    return outs


class PSPHead(nn.Module):
  def __init__(self, cin, channels, num_classes, scales, dropout, align_corners):
    super().__init__()
    self.align_corners = align_corners
    self.psp_modules = nn.ModuleList(
      [
        nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBN(cin, channels, 1, act=nn.ReLU()))
        for s in scales
      ]
    )
    self.bottleneck = ConvBN(cin + len(scales) * channels, channels, 3, act=nn.ReLU())
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    size = x.shape[2:]
    pyramid = [
      F.interpolate(m(x), size, mode='bilinear', align_corners=self.align_corners)
      for m in self.psp_modules
    ]
    return self.conv_seg(self.dropout(self.bottleneck(torch.cat([x] + pyramid, 1))))


class FCNHead(nn.Module):
  """num_convs=1, concat_input=False."""

  def __init__(self, cin, channels, num_classes, dropout):
    super().__init__()
    self.convs = nn.Sequential(ConvBN(cin, channels, 3, act=nn.ReLU()))
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    return self.conv_seg(self.dropout(self.convs(x)))


class TorchMobileNetPSPNet(nn.Module):
  """mmseg EncoderDecoder with mobilenet-v2-d8 + PSPHead (channels 512) + FCNHead (256)."""

  def __init__(
    self,
    num_classes=150,
    channels=512,
    aux_channels=256,
    scales=(1, 2, 3, 6),
    dropout=0.1,
    align_corners=False,
  ):
    super().__init__()
    self.align_corners = align_corners
    self.backbone = TorchMobileNetV2()
    self.decode_head = PSPHead(320, channels, num_classes, scales, dropout, align_corners)
    self.auxiliary_head = FCNHead(96, aux_channels, num_classes, dropout)

  def forward(self, x):
    size = x.shape[2:]
    feats = self.backbone(x)
    out = F.interpolate(
      self.decode_head(feats[3]), size, mode='bilinear', align_corners=self.align_corners
    )
    if not self.training:
      return out
    aux = F.interpolate(
      self.auxiliary_head(feats[2]), size, mode='bilinear', align_corners=self.align_corners
    )
    return out, aux
