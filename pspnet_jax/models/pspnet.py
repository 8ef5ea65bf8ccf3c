"""PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017) as a Flax NNX module.

Layout and numerics follow the authors' PyTorch implementation (semseg ``model/pspnet.py``):
dilated ResNet -> pyramid pooling over bins (1, 2, 3, 6), each branch a 1x1 conv to
``C / len(bins)`` channels + BN + ReLU, upsampled back and concatenated after the features
-> ``cls``: 3x3 conv 512 + BN + ReLU + Dropout2d(0.1) + 1x1 conv to the classes; ``aux`` on
layer3: 3x3 conv 256 + BN + ReLU + Dropout2d(0.1) + 1x1 conv. Logits are resized
bilinearly to the input size.

Module attribute names are those of the semseg state dict (``ppm.features.{i}.{1,2}``,
``cls.{0,1,4}``, ``aux.{0,1,4}``; the backbone under ``backbone``): see
``pspnet_jax.port.mapping``.

Backbones (``PSPNetConfig.backbone``): the dilated ResNet (default), mmseg's dilated
MobileNetV2 (``pspnet_jax.models.mobilenet_v2``) or a dilated torchvision ShuffleNetV2
(``pspnet_jax.models.shufflenet_v2``, ``width_mult``); each returns four feature maps, the
head reads the last and the auxiliary head the third. mmseg's PSPHead gives every pyramid branch
``channels`` (512) outputs, not ``C / len(bins)``: ``ppm_channels``.

Modes: ``model.train()`` (the default after construction) returns ``(logits, aux_logits)``
and updates BN running statistics; ``model.eval()`` returns ``logits`` only
(``model(x, aux=True)`` both: a distillation teacher's heads, ``pspnet_jax.train.distill``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax import normalize, ops
from pspnet_jax.errors import UserError
from pspnet_jax.models.layers import BatchNorm, conv2d
from pspnet_jax.models.mobilenet_v2 import MobileNetV2
from pspnet_jax.models.resnet import ResNet
from pspnet_jax.models.shufflenet_v2 import WIDTHS as SHUFFLENET_V2_WIDTHS
from pspnet_jax.models.shufflenet_v2 import ShuffleNetV2

BACKBONES = ('resnet', 'mobilenet_v2', 'shufflenet_v2')


@dataclasses.dataclass(frozen=True)
class PSPNetConfig:
  """Everything that determines the architecture. Plain data: save it as JSON."""

  num_classes: int = 150
  depth: int = 50
  stem: str = 'deep'  # 'deep' (semseg) | 'deep32' (mmseg V1c) | 'torchvision'
  output_stride: int = 8
  contract_dilation: bool = False  # semseg: False; mmseg, torchvision: True
  align_corners: bool = True  # semseg: True; mmseg: False
  bins: tuple[int, ...] = (1, 2, 3, 6)
  # Where the authors' Caffe nets (hszhao/PSPNet) differ from semseg; a Caffe port sets them.
  stride_in_1x1: bool = False  # a bottleneck's stride on its first 1x1 conv (Caffe)
  ceil_mode: bool = False  # the stem max pool rounds its output size up (Caffe)
  pyramid_fixed_size: int = 0  # 0: adaptive pooling (semseg); N: Caffe's fixed AVE
  # windows of N // bin, sized for N x N features
  base_width: int = 64  # ResNet width; smaller only for tiny test models
  head_channels: int = 512
  aux_channels: int = 256
  dropout: float = 0.1
  dtype: str = 'float32'  # compute dtype; parameters and BN stats stay float32
  # 'resnet' (depth, stem, base_width, contract_dilation apply) | 'mobilenet_v2' (mmseg's)
  # | 'shufflenet_v2' (torchvision's, width_mult applies)
  backbone: str = 'resnet'
  # ShuffleNetV2's width: 0.5, 1.0, 1.5, 2.0 (torchvision's shufflenet_v2_x0_5 ... x2_0);
  # the other backbones are built at 1.0 only (ResNet's width is base_width).
  width_mult: float = 1.0
  ppm_channels: int = 0  # pyramid branch width; 0: C / len(bins) (semseg); mmseg: 512
  # The input normalisation the weights were trained with: the network sees
  # (rgb - mean) / std, RGB on the 0-255 scale. semseg's ImageNet values by default.
  mean: tuple[float, float, float] = tuple(float(v) for v in normalize.MEAN)
  std: tuple[float, float, float] = tuple(float(v) for v in normalize.STD)
  # The output channels of single convs (and their BNs), by parameter path, where they differ
  # from the widths above: ((path, channels), ...), sorted. A pruned model
  # (``pspnet_jax.prune``) records its widths here; see ``PSPNet`` for the paths read.
  widths: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'bins', tuple(int(b) for b in self.bins))
    widths = dict(self.widths.items() if isinstance(self.widths, dict) else self.widths)
    if len(widths) != len(self.widths) or any(int(n) < 1 for n in widths.values()):
      raise UserError(
        f'PSPNetConfig.widths must map distinct layer paths to channel counts >= 1; got '
        f'{self.widths}'
      )
    object.__setattr__(self, 'widths', tuple(sorted((str(k), int(n)) for k, n in widths.items())))
    if self.backbone not in BACKBONES:
      raise UserError(f'unknown backbone {self.backbone!r}; expected one of {BACKBONES}')
    object.__setattr__(self, 'width_mult', float(self.width_mult))
    widths = sorted(SHUFFLENET_V2_WIDTHS) if self.backbone == 'shufflenet_v2' else [1.0]
    if self.width_mult not in widths:
      raise UserError(
        f'PSPNetConfig.width_mult must be one of {widths} for backbone {self.backbone!r}, '
        f'got {self.width_mult}'
      )
    n = int(self.pyramid_fixed_size)
    if n < 0 or any(n % b for b in self.bins):
      raise UserError(
        f'PSPNetConfig.pyramid_fixed_size must be 0 (adaptive pooling) or a '
        f'multiple of every bin {self.bins}, got {self.pyramid_fixed_size}'
      )
    for name in ('mean', 'std'):
      value = tuple(float(v) for v in getattr(self, name))
      if len(value) != 3 or (name == 'std' and min(value) <= 0):
        raise UserError(
          f'PSPNetConfig.{name} must be 3 numbers (RGB, 0-255 scale)'
          f'{", all positive" if name == "std" else ""}; got {value}'
        )
      object.__setattr__(self, name, value)
    jnp.dtype(self.dtype)  # fails early on a typo

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> PSPNetConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserError(f'unknown PSPNet config keys {unknown}; known keys: {sorted(known)}')
    return cls(**d)


# semseg initialises only its ResNet (model/resnet.py); the layers model/pspnet.py adds keep
# PyTorch's defaults. The backbone's convolutions use conv2d's default, 'resnet'.
NEW_LAYER_INIT = 'pytorch_default'


def _head(in_ch, mid_ch, num_classes, dtype, rngs) -> nnx.Dict:
  """semseg's ``cls`` / ``aux`` Sequential: 0 conv3x3, 1 BN, (2 ReLU, 3 Dropout2d), 4 conv1x1."""
  return nnx.Dict(
    {
      '0': conv2d(in_ch, mid_ch, 3, init=NEW_LAYER_INIT, dtype=dtype, rngs=rngs),
      '1': BatchNorm(mid_ch),
      '4': conv2d(mid_ch, num_classes, 1, bias=True, init=NEW_LAYER_INIT, dtype=dtype, rngs=rngs),
    }
  )


class PSPNet(nnx.Module):
  """``config.widths`` may set the channels of ``cls.0``, ``aux.0``, ``ppm.features.{i}.1`` and
  of the backbone's convs that ``ResNet`` names (``backbone.``-prefixed paths)."""

  def __init__(self, config: PSPNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    widths = dict(config.widths)
    if config.backbone == 'mobilenet_v2':
      self.backbone = MobileNetV2(output_stride=config.output_stride, dtype=dtype, rngs=rngs)
    elif config.backbone == 'shufflenet_v2':
      self.backbone = ShuffleNetV2(
        width_mult=config.width_mult, output_stride=config.output_stride, dtype=dtype, rngs=rngs
      )
    else:
      self.backbone = ResNet(
        config.depth,
        stem=config.stem,
        output_stride=config.output_stride,
        contract_dilation=config.contract_dilation,
        base_width=config.base_width,
        stride_in_1x1=config.stride_in_1x1,
        ceil_mode=config.ceil_mode,
        widths={k.removeprefix('backbone.'): n for k, n in widths.items()},
        dtype=dtype,
        rngs=rngs,
      )
    c3, c4 = self.backbone.out_channels[2:]
    reduction = config.ppm_channels or c4 // len(config.bins)
    branches = [widths.get(f'ppm.features.{i}.1', reduction) for i in range(len(config.bins))]
    self.ppm = nnx.Dict(
      {
        'features': nnx.List(
          [
            nnx.Dict(
              {
                '1': conv2d(c4, n, 1, init=NEW_LAYER_INIT, dtype=dtype, rngs=rngs),
                '2': BatchNorm(n),
              }
            )
            for n in branches
          ]
        )
      }
    )
    fea = c4 + sum(branches)
    head = widths.get('cls.0', config.head_channels)
    self.cls = _head(fea, head, config.num_classes, dtype, rngs)
    self.aux = _head(c3, widths.get('aux.0', config.aux_channels), config.num_classes, dtype, rngs)
    self._check_widths(widths)
    # Dropout2d zeroes whole channels: the mask is broadcast over H and W.
    self.dropout = nnx.Dropout(config.dropout, broadcast_dims=(1, 2))
    self.deterministic = False  # toggled with the BNs by model.train() / model.eval()

  def _check_widths(self, widths: dict[str, int]):
    """Every entry of ``config.widths`` must have been read: it names a conv of this
    architecture that now has that many outputs."""
    for path, n in widths.items():
      layer = self
      try:
        for key in path.split('.'):
          if isinstance(layer, nnx.List):
            layer = layer[int(key)]
          else:
            layer = layer[key] if isinstance(layer, nnx.Dict) else getattr(layer, key)
      except (AttributeError, KeyError, IndexError, ValueError):
        layer = None
      if not isinstance(layer, nnx.Conv) or layer.out_features != n:
        raise UserError(
          f'PSPNetConfig.widths: {path!r} is not a conv whose width this {self.config.backbone} '
          'PSPNet can set (model_config.json was edited, or written by another version)'
        )

  def _ppm_branch(self, i: int, pooled: jax.Array) -> jax.Array:
    branch = self.ppm['features'][i]
    return jax.nn.relu(branch['2'](branch['1'](pooled)))

  def _apply_head(self, head: nnx.Dict, x: jax.Array, rngs) -> jax.Array:
    x = jax.nn.relu(head['1'](head['0'](x)))
    if not self.deterministic:  # eval programs hold no dropout at all (exporters patch it)
      x = self.dropout(x, rngs=rngs)
    return head['4'](x)

  def __call__(
    self,
    x: jax.Array,
    *,
    rngs: nnx.Rngs | None = None,
    upsample: bool = True,
    aux: bool | None = None,
  ):
    """x: [B, H, W, 3] normalised image, ``(rgb - config.mean) / config.std`` -> logits
    [B, H, W, num_classes] float32.

    In train mode returns ``(logits, aux_logits)``, both at input size; dropout then needs
    ``rngs`` with a ``dropout`` stream (none is needed when ``dropout == 0``).
    ``upsample=False`` returns them at the heads' own resolution (the input's / output
    stride), still float32: the train step's loss resizes them itself
    (``pspnet_jax.train.loss.upsampled_cross_entropy``). ``aux`` returns the pair (True)
    or the logits alone (False) whatever the mode.
    """
    h, w = x.shape[1:3]
    ac = self.config.align_corners
    resize = (lambda z: ops.resize_bilinear(z, (h, w), ac)) if upsample else (lambda z: z)
    _, _, c3, c4 = self.backbone(x)
    y = ops.pyramid_pool(
      c4,
      self.config.bins,
      self._ppm_branch,
      align_corners=ac,
      fixed_size=self.config.pyramid_fixed_size,
    )
    logits = resize(self._apply_head(self.cls, y, rngs).astype(jnp.float32))
    if not (aux if aux is not None else not self.deterministic):
      return logits
    return logits, resize(self._apply_head(self.aux, c3, rngs).astype(jnp.float32))
