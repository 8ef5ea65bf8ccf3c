"""Dilated ResNet backbones (He et al. 2016; dilation as in Yu & Koltun 2016 / PSPNet).

Attribute names follow the PyTorch layouts PSPNet is published in (the authors' semseg
``model/resnet.py``), so a flattened parameter path such as ``layer1.0.conv2.kernel`` is
the PyTorch key ``layer1.0.conv2.weight``:

- ``layer0``: the stem, keyed by the index of each layer in semseg's ``nn.Sequential``
  (``'0','3','6'`` convs, ``'1','4','7'`` BNs; the 7x7 stem has only ``'0'`` and ``'1'``).
- ``layer{1-4}.{i}``: residual blocks with ``conv{1,2,3}``, ``bn{1,2,3}`` and
  ``downsample.{0,1}`` (conv, BN).

Stems: ``deep`` (semseg, 3x3 convs 64-64-128), ``deep32`` (mmseg ResNetV1c, 32-32-64),
``torchvision`` (7x7 conv 64). Output stride 8 dilates layer3 by 2 and layer4 by 4; 16
dilates layer4 by 2. ``contract_dilation`` gives the first block of a dilated layer half
the dilation (mmseg, torchvision); semseg dilates every block fully.

``widths`` (``PSPNetConfig.widths``, relative to the backbone) sets the output channels of a
conv and its BN by path: a block's inner convs (``layer{1-4}.{i}.conv1``, and ``conv2`` of a
bottleneck) and the deep stems' first two convs (``layer0.0``, ``layer0.3``); the next conv
takes that many inputs. Unlisted convs keep the widths above.

Two options are the authors' Caffe nets (hszhao/PSPNet): ``stride_in_1x1`` (a bottleneck's
stride on its first 1x1 conv) and ``ceil_mode`` (the stem's max pool rounds its output size
up, as every Caffe pooling does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax import ops
from pspnet_jax.errors import UserError
from pspnet_jax.models.layers import BatchNorm, conv2d

BLOCKS = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
STEMS = ('deep', 'deep32', 'torchvision')


def stem_widths(stem: str, base_width: int) -> tuple[int, ...]:
  if stem == 'deep':
    return (base_width, base_width, 2 * base_width)
  if stem == 'deep32':
    return (base_width // 2, base_width // 2, base_width)
  if stem == 'torchvision':
    return (base_width,)
  raise UserError(f'unknown stem {stem!r}; expected one of {STEMS}')


def stage_geometry(output_stride: int, contract_dilation: bool):
  """(stride, first-block dilation, dilation) for layer1..layer4."""
  if output_stride == 8:
    strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
  elif output_stride == 16:
    strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
  elif output_stride == 32:
    strides, dilations = (1, 2, 2, 2), (1, 1, 1, 1)
  else:
    raise UserError(f'output_stride must be 8, 16 or 32, got {output_stride}')
  first = tuple(d // 2 if contract_dilation and d > 1 else d for d in dilations)
  return tuple(zip(strides, first, dilations))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch, planes, stride, dilation, *, dtype, rngs, widths=(None,)):
    # mmseg's dilated BasicBlock: conv1 carries stride and dilation, conv2 is plain 3x3.
    w1 = widths[0] or planes
    self.conv1 = conv2d(in_ch, w1, 3, stride=stride, dilation=dilation, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(w1)
    self.conv2 = conv2d(w1, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(planes)
    self.downsample = _downsample(in_ch, planes, stride, dtype, rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """ResNet bottleneck. v1.5 by default, the stride on the 3x3 conv (torchvision, semseg);
  ``stride_in_1x1`` puts it on the first 1x1 conv, as the original ResNet and the authors'
  Caffe PSPNet do."""

  expansion = 4

  def __init__(
    self, in_ch, planes, stride, dilation, *, dtype, rngs, stride_in_1x1=False, widths=(None,) * 2
  ):
    s1, s2 = (stride, 1) if stride_in_1x1 else (1, stride)
    w1, w2 = (w or planes for w in widths)
    self.conv1 = conv2d(in_ch, w1, 1, stride=s1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(w1)
    self.conv2 = conv2d(w1, w2, 3, stride=s2, dilation=dilation, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(w2)
    self.conv3 = conv2d(w2, planes * 4, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(planes * 4)
    self.downsample = _downsample(in_ch, planes * 4, stride, dtype, rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


def _downsample(in_ch, out_ch, stride, dtype, rngs):
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List(
    [conv2d(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs), BatchNorm(out_ch)]
  )


def _shortcut(downsample, x):
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


class ResNet(nnx.Module):
  """Dilated ResNet. ``__call__(x)`` returns the outputs of layer1..layer4.

  x: [B, H, W, 3] -> 4 arrays [B, h_i, w_i, C_i] (C = 256/512/1024/2048 for ResNet-50+,
  64/128/256/512 for ResNet-18/34, times ``base_width / 64``).
  """

  def __init__(
    self,
    depth: int = 50,
    *,
    stem: str = 'deep',
    output_stride: int = 8,
    contract_dilation: bool = False,
    base_width: int = 64,
    stride_in_1x1: bool = False,
    ceil_mode: bool = False,
    widths: dict[str, int] | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if depth not in BLOCKS:
      raise UserError(f'unsupported ResNet depth {depth}; expected one of {sorted(BLOCKS)}')
    kind, counts = BLOCKS[depth]
    if stride_in_1x1 and kind != 'bottleneck':
      raise UserError(
        f"stride_in_1x1 places a bottleneck's stride; ResNet-{depth} has basic blocks"
      )
    block = Bottleneck if kind == 'bottleneck' else BasicBlock
    options = {'stride_in_1x1': True} if stride_in_1x1 else {}
    self.dtype = dtype
    self.ceil_mode = ceil_mode
    widths = widths or {}
    stem_out = stem_widths(stem, base_width)
    if stem == 'torchvision':
      layers = {
        '0': conv2d(3, stem_out[0], 7, stride=2, dtype=dtype, rngs=rngs),
        '1': BatchNorm(stem_out[0]),
      }
    else:
      layers, in_ch = {}, 3
      for i, w in enumerate(stem_out):
        w = widths.get(f'layer0.{3 * i}', w) if i < 2 else w
        layers[str(3 * i)] = conv2d(in_ch, w, 3, stride=2 if i == 0 else 1, dtype=dtype, rngs=rngs)
        layers[str(3 * i + 1)] = BatchNorm(w)
        in_ch = w
    self.layer0 = nnx.Dict(layers)
    in_ch = stem_out[-1]
    inner = ('conv1',) if block is BasicBlock else ('conv1', 'conv2')
    geometry = stage_geometry(output_stride, contract_dilation)
    stages = []
    for k, (n, (stride, first_dilation, dilation)) in enumerate(zip(counts, geometry)):
      planes = base_width * 2**k
      blocks = []
      for i in range(n):
        blocks.append(
          block(
            in_ch,
            planes,
            stride if i == 0 else 1,
            first_dilation if i == 0 else dilation,
            dtype=dtype,
            rngs=rngs,
            widths=tuple(widths.get(f'layer{k + 1}.{i}.{c}') for c in inner),
            **options,
          )
        )
        in_ch = planes * block.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.out_channels = tuple(base_width * 2**k * block.expansion for k in range(4))

  def stem(self, x):
    n = len(self.layer0) // 2
    for i in range(n):
      x = jax.nn.relu(self.layer0[str(3 * i + 1)](self.layer0[str(3 * i)](x)))
    return ops.max_pool_3x3_s2(x, self.ceil_mode)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = self.stem(x.astype(self.dtype))
    feats = []
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in stage:
        x = blk(x)
      feats.append(x)
    return feats
