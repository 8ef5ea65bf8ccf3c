"""Infers the ``PSPNetConfig`` of a canonical (semseg-layout) state dict from its shapes.

The layout tells the backbone module (``PSPNetConfig.backbone``) and what shapes cannot
(dilation contraction, align_corners); for ResNet, shapes tell depth (blocks per stage and
block kind), width and stem; for ShuffleNetV2 its width; for every backbone, head widths, pyramid branch width and
classes.
Shapes are PyTorch's: conv weights [out, in, kh, kw].
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from pspnet_jax.models import PSPNetConfig
from pspnet_jax.models.mobilenet_v2 import STEM_CHANNELS
from pspnet_jax.models.resnet import BLOCKS
from pspnet_jax.models.shufflenet_v2 import WIDTHS as SHUFFLENET_V2_WIDTHS
from pspnet_jax.port.layout import Layout
from pspnet_jax.port.mapping import PortError

# Heads of a backbone-only port are trained from scratch; without a user choice they get
# ADE20K's 150 classes, PSPNetConfig's default.
DEFAULT_NUM_CLASSES = PSPNetConfig.num_classes


def infer_config(
  state_dict: Mapping[str, np.ndarray],
  layout: Layout,
  *,
  with_heads: bool,
  num_classes: int | None,
  source: str,
  with_aux: bool = True,
) -> PSPNetConfig:
  """Canonical state dict -> config. ``with_heads``: read classes and head widths too;
  ``with_aux=False``: the file has no auxiliary head (it keeps the default width).

  ``num_classes`` must agree with the checkpoint's classifier when heads are ported;
  without heads it sets the fresh heads' classes (default ``DEFAULT_NUM_CLASSES``).
  """

  def shape(key):
    if key not in state_dict:
      raise PortError(
        f'{source}: no tensor for {key} in the {layout.name} layout, which the '
        'architecture is read from; is the file complete and of this layout?'
      )
    return tuple(np.shape(state_dict[key]))

  if layout.config.get('backbone') == 'mobilenet_v2':
    fields = _mobilenet_v2_fields(shape, layout, source)
  elif layout.config.get('backbone') == 'shufflenet_v2':
    fields = _shufflenet_v2_fields(shape, layout, source)
  else:
    fields = _resnet_fields(state_dict, shape, layout, source)
  if not with_heads:
    fields['num_classes'] = DEFAULT_NUM_CLASSES if num_classes is None else int(num_classes)
    return PSPNetConfig(**fields)
  classes = shape('cls.4.weight')[0]
  if num_classes is not None and int(num_classes) != classes:
    raise PortError(
      f'{source}: the checkpoint classifies {classes} classes (cls.4.weight '
      f'{shape("cls.4.weight")}) but num_classes={num_classes} was asked; drop '
      'num_classes, or port the backbone only (backbone_only=True, CLI '
      '--backbone-only) to train new heads'
    )
  branches = _count(state_dict, r'^ppm\.features\.(\d+)\.1\.weight$')
  bins = fields.get('bins', PSPNetConfig.bins)
  if branches != len(bins):
    raise PortError(
      f'{source}: {branches} pyramid pooling branches; only the {len(bins)} bins '
      f'{bins} of PSPNet are supported'
    )
  # A branch conv [width, C, 1, 1]: semseg's width is C / len(bins) (ppm_channels 0).
  width, features = shape('ppm.features.0.1.weight')[:2]
  fields.update(
    num_classes=classes,
    head_channels=shape('cls.0.weight')[0],
    ppm_channels=0 if width == features // len(bins) else width,
  )
  if with_aux:
    fields['aux_channels'] = shape('aux.0.weight')[0]
  return PSPNetConfig(**fields)


def _mobilenet_v2_fields(shape, layout: Layout, source: str) -> dict:
  """mmseg's MobileNetV2 at widen factor 1.0 (the only width built): a 32-channel stem."""
  stem = shape('conv1.conv.weight')
  if stem[0] != STEM_CHANNELS:
    raise PortError(
      f'{source}: MobileNetV2 stem conv1.conv.weight {stem} has {stem[0]} '
      f'channels; only widen factor 1.0 ({STEM_CHANNELS} channels) is supported'
    )
  return dict(layout.config)


def _shufflenet_v2_fields(shape, layout: Layout, source: str) -> dict:
  """torchvision's width (``width_mult``) from conv5's input and output channels."""
  conv5 = shape('conv5.0.weight')
  width = next(
    (w for w, c in SHUFFLENET_V2_WIDTHS.items() if (c[4], c[3]) == tuple(conv5[:2])), None
  )
  if width is None:
    known = ', '.join(f'x{w}: {c[3]} -> {c[4]}' for w, c in SHUFFLENET_V2_WIDTHS.items())
    raise PortError(
      f'{source}: ShuffleNetV2 conv5.0.weight {conv5} maps {conv5[1]} -> {conv5[0]} '
      f'channels, which is no torchvision width ({known})'
    )
  return dict(layout.config, width_mult=width)


def _resnet_fields(state_dict, shape, layout: Layout, source: str) -> dict:
  kind = 'bottleneck' if 'layer1.0.conv3.weight' in state_dict else 'basic'
  counts = tuple(_count(state_dict, rf'^layer{k}\.(\d+)\.conv1\.weight$') for k in range(1, 5))
  depth = next((d for d, (kd, c) in BLOCKS.items() if (kd, c) == (kind, counts)), None)
  if depth is None:
    known = ', '.join(f'{d}: {c}' for d, (_, c) in BLOCKS.items())
    raise PortError(
      f'{source}: layer1..layer4 hold {counts} {kind} blocks, which is no '
      f'ResNet depth this model builds ({known}); is a block missing?'
    )
  base_width = shape('layer1.0.conv1.weight')[0]
  return dict(
    layout.config, depth=depth, base_width=base_width, stem=_stem(shape, base_width, source)
  )


def _stem(shape, base_width: int, source: str) -> str:
  """deep: 3x3 convs (w, w, 2w); deep32 (ResNetV1c): (w/2, w/2, w); torchvision: one 7x7."""
  first = shape('layer0.0.weight')
  if first[-1] == 7:
    return 'torchvision'
  out = shape('layer0.6.weight')[0]
  if out == 2 * base_width:
    return 'deep'
  if out == base_width:
    return 'deep32'
  raise PortError(
    f'{source}: stem output {out} channels fits neither the deep stem '
    f'({2 * base_width}) nor the deep32 stem ({base_width}) for layer1 width '
    f'{base_width}'
  )


def _count(state_dict, pattern: str) -> int:
  """1 + the largest index the pattern's group captures (0 when none): gaps are left for the
  strict mapping to report as missing keys."""
  found = [int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0
