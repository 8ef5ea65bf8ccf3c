"""Infers the ``PSPNetConfig`` of a canonical (semseg-layout) state dict from its shapes.

Shapes tell depth (blocks per stage and block kind), ResNet width, stem, head widths and
classes; the layout tells what shapes cannot (dilation contraction, align_corners).
Shapes are PyTorch's: conv weights [out, in, kh, kw].
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from pspnet_jax.models import PSPNetConfig
from pspnet_jax.models.resnet import BLOCKS
from pspnet_jax.port.layout import Layout
from pspnet_jax.port.mapping import PortError

# Heads of a backbone-only port are trained from scratch; without a user choice they get
# ADE20K's 150 classes, PSPNetConfig's default.
DEFAULT_NUM_CLASSES = PSPNetConfig.num_classes


def infer_config(state_dict: Mapping[str, np.ndarray], layout: Layout, *, with_heads: bool,
                 num_classes: int | None, source: str, with_aux: bool = True) -> PSPNetConfig:
  """Canonical state dict -> config. ``with_heads``: read classes and head widths too;
  ``with_aux=False``: the file has no auxiliary head (it keeps the default width).

  ``num_classes`` must agree with the checkpoint's classifier when heads are ported;
  without heads it sets the fresh heads' classes (default ``DEFAULT_NUM_CLASSES``).
  """
  def shape(key):
    if key not in state_dict:
      raise PortError(f'{source}: no tensor for {key} in the {layout.name} layout, which the '
                      'architecture is read from; is the file complete and of this layout?')
    return tuple(np.shape(state_dict[key]))

  kind = 'bottleneck' if 'layer1.0.conv3.weight' in state_dict else 'basic'
  counts = tuple(_count(state_dict, rf'^layer{k}\.(\d+)\.conv1\.weight$') for k in range(1, 5))
  depth = next((d for d, (kd, c) in BLOCKS.items() if (kd, c) == (kind, counts)), None)
  if depth is None:
    known = ', '.join(f'{d}: {c}' for d, (_, c) in BLOCKS.items())
    raise PortError(f'{source}: layer1..layer4 hold {counts} {kind} blocks, which is no '
                    f'ResNet depth this model builds ({known}); is a block missing?')
  base_width = shape('layer1.0.conv1.weight')[0]
  fields = dict(layout.config, depth=depth, base_width=base_width,
                stem=_stem(shape, base_width, source))
  if not with_heads:
    fields['num_classes'] = DEFAULT_NUM_CLASSES if num_classes is None else int(num_classes)
    return PSPNetConfig(**fields)
  classes = shape('cls.4.weight')[0]
  if num_classes is not None and int(num_classes) != classes:
    raise PortError(f'{source}: the checkpoint classifies {classes} classes (cls.4.weight '
                    f'{shape("cls.4.weight")}) but num_classes={num_classes} was asked; drop '
                    'num_classes, or port the backbone only (backbone_only=True, CLI '
                    '--backbone-only) to train new heads')
  branches = _count(state_dict, r'^ppm\.features\.(\d+)\.1\.weight$')
  bins = fields.get('bins', PSPNetConfig.bins)
  if branches != len(bins):
    raise PortError(f'{source}: {branches} pyramid pooling branches; only the {len(bins)} bins '
                    f'{bins} of PSPNet are supported')
  fields.update(num_classes=classes, head_channels=shape('cls.0.weight')[0])
  if with_aux:
    fields['aux_channels'] = shape('aux.0.weight')[0]
  return PSPNetConfig(**fields)


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
  raise PortError(f'{source}: stem output {out} channels fits neither the deep stem '
                  f'({2 * base_width}) nor the deep32 stem ({base_width}) for layer1 width '
                  f'{base_width}')


def _count(state_dict, pattern: str) -> int:
  """1 + the largest index the pattern's group captures (0 when none): gaps are left for the
  strict mapping to report as missing keys."""
  found = [int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0
