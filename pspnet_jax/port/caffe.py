"""The authors' Caffe PSPNet releases (github.com/hszhao/PSPNet at commit 798bdc9:
``pspnet50_ADE20K.caffemodel``, ``pspnet101_VOC2012.caffemodel``,
``pspnet101_cityscapes.caffemodel``) -> a canonical (semseg-layout) state dict and the
``PSPNetConfig`` that computes what that Caffe computes.

The architecture is read from the file's own layer graph, not from a table: the stem is the
three convolutions from the input, each residual block is an ``Eltwise`` sum of a
``1x1 -> 3x3 -> 1x1`` chain (each conv + ``BN``, ReLUs between) with the block's input or
its ``1x1`` projection, a stage starts where a projection does, and the pyramid is the
``Pooling`` -> conv -> BN -> ReLU -> ``Interp`` branches that a ``Concat`` joins to the
last block's output, followed by the head (3x3 conv, BN, ReLU, Dropout, 1x1 classifier).
``Split`` layers (Caffe's ``InsertSplits``) and in-place layers are followed through.
Layer names are only used to name layers in messages.

The reader runs in four stages, each usable on its own: **parse** (``caffe_format``: the
file -> ``Net``, plain layers with their parameters and blobs), **layer graph**
(``LayerGraph``: which layer produced each layer's inputs, who reads each output), **match**
(``match``: the graph -> ``Match``, where each of the model's modules sits in the file and
the config fields the graph fixes; parameters only, no blob is read, so it runs on a deploy
prototxt as well), **weights** (``take_weights``: the matched layers' blobs, checked against
the shapes the match expects -> the canonical state dict). ``read_net`` runs the last three.

What the fork's layers compute, and where pspnet_jax differs from semseg for them:

- ``BN`` (``bn_layer.cpp``): four blobs, slope, bias, moving mean, moving variance, each
  ``[1, C, 1, 1]``; at test ``(x - mean) / sqrt(var + eps) * slope + bias`` with ``eps``
  from ``bn_param`` (default 1e-5, pspnet_jax's BatchNorm's; other values are refused).
- ``Pooling`` (``pooling_layer.cpp``) rounds its output size up: the stem's max pool is
  ``ceil_mode``; the pyramid's ``AVE`` pools have fixed windows (``kernel = stride = N /
  bin`` for ``N x N`` features at the training crop: 60 at 473, 90 at 713), i.e.
  ``pyramid_fixed_size = N``.
- ``Interp`` (``interp_layer.cpp``, ``util/interp.cpp``): bilinear with
  ``(in - 1) / (out - 1)`` sample spacing, i.e. ``align_corners=True``; the pyramid's
  resize to ``N x N`` and the logits' ``zoom_factor: 8`` (``(h - 1) * 8 + 1``: the input
  size for the ``8k + 1`` crops the nets run at).
- Bottlenecks carry their stride on the first 1x1 conv (``stride_in_1x1``); layer3/layer4
  are dilated 2/4 in every block, as semseg's.
- The pyramid is concatenated as ``[features, bin 6, bin 3, bin 2, bin 1]`` (the order of
  the ``Concat``'s bottoms, read from the file): the head conv's input channels are
  reordered to pspnet_jax's ``[features, bin 1, bin 2, bin 3, bin 6]``.
- The input (``evaluation/eval_all.m``, ``pre_img.m``): RGB minus ``CAFFE_MEAN`` on the
  0-255 scale, channels reversed to BGR, no std. The BGR order goes into the first conv's
  weights, so the ported model takes RGB with ``mean = CAFFE_MEAN``, ``std = 1``.
- The deploy nets hold no auxiliary head: the model's ``aux`` head is freshly
  initialised. Layers the file holds off the path to the classifier (a training-only
  branch, data and loss layers) are dropped and reported.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from pspnet_jax.models.resnet import stage_geometry
from pspnet_jax.port.caffe_format import Layer, Net
from pspnet_jax.port.layout import Layout
from pspnet_jax.port.mapping import PortError

# evaluation/eval_all.m of hszhao/PSPNet: "means to be subtracted and the given values are
# used in our training stage", RGB; the network sees BGR with no std.
CAFFE_MEAN = (123.68, 116.779, 103.939)
CAFFE_STD = (1.0, 1.0, 1.0)
BN_EPS = 1e-5  # pspnet_jax.models.layers.BatchNorm's, and bn_param's default

LAYOUT = Layout(
  name='caffe',
  description="the authors' Caffe PSPNet (hszhao/PSPNet *.caffemodel)",
  renames=(),
  drops=(),
  config={
    'contract_dilation': False,
    'align_corners': True,
    'stride_in_1x1': True,
    'ceil_mode': True,
    'mean': CAFFE_MEAN,
    'std': CAFFE_STD,
  },
  backbone_only=False,
  recognise=lambda state_dict: None,  # recognised by file, not by keys (convert.py)
)

# Layers a path goes through that keep the shape (BN is matched to its conv by position).
_THROUGH = ('BN', 'ReLU', 'Dropout')
_COMPUTE = {
  'Convolution',
  'BN',
  'ReLU',
  'Pooling',
  'Eltwise',
  'Concat',
  'Interp',
  'Dropout',
  'Split',
}
# Caffe layer types a training net holds beside the network itself: they carry no weights and
# are dropped when they are off the path to the classifier.
_DATA = {
  'Input',
  'Data',
  'ImageData',
  'ImageSegData',
  'DummyData',
  'HDF5Data',
  'MemoryData',
  'WindowData',
  'MatRead',
}
_LOSS = {
  'SoftmaxWithLoss',
  'Softmax',
  'Accuracy',
  'SegAccuracy',
  'ArgMax',
  'Silence',
  'EuclideanLoss',
  'HingeLoss',
  'InfogainLoss',
  'MultinomialLogisticLoss',
  'SigmoidCrossEntropyLoss',
  'ContrastiveLoss',
  'HDF5Output',
  'MatWrite',
  'UniqueLabel',
}
TRAINING_ONLY = 'training-only layers, off the path to the classifier (not in the deploy net)'
DATA_LAYERS = 'data layers (the model takes the image as its input)'


@dataclasses.dataclass
class CaffeNet:
  """What the file says, in pspnet_jax's terms."""

  canonical: dict[str, np.ndarray]  # semseg-layout state dict (aux absent)
  file_keys: dict[str, str]  # canonical key -> 'layer name (blob i)'
  config: dict[str, Any]  # PSPNetConfig fields the file fixes
  dropped: dict[str, list[str]]  # reason -> layer names
  notes: list[str]  # for the port report
  used: set[str]  # names of the layers the model computes
  feature_size: int  # N: the pyramid's windows are sized for N x N


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one of the model's modules sits in the file: layer ``layer`` (its index), a
  ``'conv'`` of weight ``shape`` (out, in, k, k) with or without ``bias``, or a ``'bn'`` of
  ``shape`` (channels,)."""

  layer: int
  kind: str
  shape: tuple[int, ...]
  bias: bool = False


@dataclasses.dataclass
class Match:
  """The model's modules found in the layer graph, before any weight is read."""

  slots: dict[str, Slot]  # canonical prefix ('layer1.0.conv1', 'layer1.0.bn1') -> its layer
  config: dict[str, Any]  # PSPNetConfig fields the graph fixes
  head_input: tuple[tuple[str, int], ...]  # the Concat's inputs in file order: (name, channels)
  dropped: dict[str, list[str]]  # reason -> layer names
  notes: list[str]
  used: set[int]  # indices of the layers the model computes
  feature_size: int


class LayerGraph:
  """Which layer produced each bottom, following Caffe's blob names in file order (a layer
  writing a blob it reads, in place, makes a new version of it)."""

  def __init__(self, net: Net):
    self.net, self.layers, self.source = net, net.layers, net.source
    self.inputs: list[list[int | None]] = []  # None: a net input (NetParameter.input)
    self.by_name: dict[str, int] = {}
    producer: dict[str, int | None] = {name: None for name in net.inputs}
    for i, layer in enumerate(self.layers):
      if layer.name in self.by_name:
        raise PortError(f'{self.source}: two layers are named {layer.name!r}; the file is damaged')
      self.by_name[layer.name] = i
      deps = []
      for bottom in layer.bottoms:
        if bottom not in producer:
          raise PortError(
            f'{self.source}: layer {layer.name!r} reads blob {bottom!r}, which no '
            'earlier layer writes; the file is damaged or not a Caffe net'
          )
        deps.append(producer[bottom])
      self.inputs.append(deps)
      for top in layer.tops:
        producer[top] = i
    self.consumers: list[list[int]] = [[] for _ in self.layers]
    for i, deps in enumerate(self.inputs):
      for d in deps:
        if d is not None:
          self.consumers[d].append(i)

  def name(self, i: int | None) -> str:
    return 'the input' if i is None else repr(self.layers[i].name)

  def trace(self, dep: int | None) -> tuple[int | None, tuple[str, ...], list[int]]:
    """Back from a producer through Splits and shape-keeping layers: (the first other
    layer, the kinds passed through in forward order, their indices)."""
    kinds, through = [], []
    while (
      dep is not None
      and self.layers[dep].type in ('Split',) + _THROUGH
      and len(self.inputs[dep]) == 1
    ):
      if self.layers[dep].type != 'Split':
        kinds.append(self.layers[dep].type)
        through.append(dep)
      dep = self.inputs[dep][0]
    return dep, tuple(reversed(kinds)), list(reversed(through))

  def input_of(self, i: int) -> tuple[int | None, tuple[str, ...], list[int]]:
    if len(self.inputs[i]) != 1:
      raise PortError(
        f'{self.source}: layer {self.layers[i].name!r} ({self.layers[i].type}) '
        f'reads {len(self.inputs[i])} blobs, expected 1'
      )
    return self.trace(self.inputs[i][0])

  def readers(self, i: int) -> list[int]:
    """Layers reading ``i``'s output, through Splits and shape-keeping layers."""
    out, todo = [], list(self.consumers[i])
    while todo:
      j = todo.pop(0)
      if self.layers[j].type in ('Split',) + _THROUGH:
        todo += self.consumers[j]
      else:
        out.append(j)
    return out

  def ancestors(self, i: int) -> set[int]:
    seen, todo = set(), [i]
    while todo:
      j = todo.pop()
      if j in seen:
        continue
      seen.add(j)
      todo += [d for d in self.inputs[j] if d is not None]
    return seen


def _kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(k for k in kinds if k != 'Dropout')  # identity at inference


def _fail(graph: LayerGraph, i: int | None, message: str):
  where = f'layer {graph.name(i)}: ' if i is not None else ''
  raise PortError(f'{graph.source}: {where}{message}')


class _Matcher:
  """Walks the graph once: finds each module's layer, checks its parameters, fixes the config."""

  def __init__(self, graph: LayerGraph):
    self.g = graph
    self.slots: dict[str, Slot] = {}
    self.used: set[int] = set()
    self.channels: dict[int, int] = {}  # layer index -> output channels
    self.head_input: tuple[tuple[str, int], ...] = ()

  def fail(self, i: int | None, message: str):
    _fail(self.g, i, message)

  # ---- layers ---------------------------------------------------------------------------

  def conv(
    self,
    i: int,
    prefix: str,
    *,
    kernel: int,
    in_ch: int,
    bias: bool = False,
    stride: int | None = None,
    dilation: int | None = None,
  ) -> dict:
    """Checks a Convolution's parameters, records it as ``prefix``; returns its geometry."""
    layer = self.g.layers[i]
    if layer.type != 'Convolution':
      self.fail(i, f'is a {layer.type} layer where PSPNet has a convolution')
    p = lambda f: layer.param('convolution_param', f)
    geo = {
      'kernel': _one(p('kernel_size'), p('kernel_h'), p('kernel_w'), None, self, i, 'kernel_size'),
      'stride': _one(p('stride'), p('stride_h'), p('stride_w'), 1, self, i, 'stride'),
      'pad': _one(p('pad'), p('pad_h'), p('pad_w'), 0, self, i, 'pad'),
      'dilation': _one(p('dilation'), 0, 0, 1, self, i, 'dilation'),
      'out': int(p('num_output')),
      'bias': bool(p('bias_term')),
    }
    if p('group') != 1 or p('axis') != 1:
      self.fail(
        i, f"group {p('group')}, axis {p('axis')}: PSPNet's convolutions are group 1 over axis 1"
      )
    want = {'kernel': kernel, 'bias': bias, 'stride': stride, 'dilation': dilation}
    for key, value in want.items():
      if value is not None and geo[key] != value:
        self.fail(i, f'{key} {geo[key]} where PSPNet has {value}')
    if geo['pad'] != geo['dilation'] * (kernel - 1) // 2:
      self.fail(
        i,
        f'pad {geo["pad"]} with kernel {kernel} and dilation {geo["dilation"]}: '
        f'PSPNet pads {geo["dilation"] * (kernel - 1) // 2} (the output keeps its size)',
      )
    self.slots[prefix] = Slot(i, 'conv', (geo['out'], in_ch, kernel, kernel), geo['bias'])
    self.used.add(i)
    self.channels[i] = geo['out']
    return geo

  def bn(self, i: int, prefix: str, channels: int):
    eps = self.g.layers[i].param('bn_param', 'eps')
    if np.float32(eps) != np.float32(BN_EPS):
      self.fail(i, f"eps {eps}; pspnet_jax's BatchNorm uses {BN_EPS}")
    self.slots[prefix] = Slot(i, 'bn', (channels,))
    self.used.add(i)

  def relu(self, i: int):
    slope = self.g.layers[i].param('relu_param', 'negative_slope')
    if slope != 0:
      self.fail(i, f"a leaky ReLU (negative_slope {slope}); PSPNet's are plain")
    self.used.add(i)

  def conv_bn(self, i: int, prefix: str, bn_prefix: str, **kw) -> dict:
    """A conv and the BN right after it (the only layer reading it)."""
    geo = self.conv(i, prefix, **kw)
    bns = [j for j in self.g.consumers[i] if self.g.layers[j].type == 'BN']
    if len(bns) != 1 or len(self.g.consumers[i]) != 1:
      self.fail(
        i,
        'is not followed by one BN layer (PSPNet normalises every convolution but the classifier)',
      )
    self.bn(bns[0], bn_prefix, geo['out'])
    return geo

  def expect_input(self, i: int, source: int | None, kinds: tuple[str, ...], what: str):
    got, got_kinds, through = self.g.input_of(i)
    if got != source or _kinds(got_kinds) != kinds:
      path = ' -> '.join(got_kinds) or 'directly'
      want = ' -> '.join(kinds) or 'directly'
      self.fail(
        i,
        f"reads {self.g.name(got)} ({path}); PSPNet's {what} reads {self.g.name(source)} ({want})",
      )
    for j in through:
      if self.g.layers[j].type == 'ReLU':
        self.relu(j)
      elif self.g.layers[j].type == 'Dropout':
        self.used.add(j)

  # ---- the network ------------------------------------------------------------------------

  def match(self) -> Match:
    g = self.g
    for i, layer in enumerate(g.layers):
      if layer.type not in _COMPUTE | _DATA | _LOSS:
        self.fail(
          i,
          f'unknown layer type {layer.type!r} (the PSPNet port knows '
          f'{", ".join(sorted(_COMPUTE))} and data and loss layers)',
        )
    stem_end = self.stem()
    blocks = self.blocks(stem_end)
    geometry, stride_in_1x1 = self.stages(blocks)
    trunk = blocks[-1]['sum']
    bins, size, order, concat = self.pyramid(trunk, blocks[-1]['out'])
    head = self.head(concat, blocks[-1]['out'], bins, order)
    fits = [
      (os, c) for os in (8, 16, 32) for c in (False, True) if stage_geometry(os, c) == geometry
    ]
    if not fits:
      self.fail(
        None,
        f"the stages' (stride, first dilation, dilation) are {geometry}, which "
        'is no dilated ResNet with output stride 8, 16 or 32',
      )
    out_stride, contract = fits[0]
    self.zoom(head, out_stride)

    classifier_path = g.ancestors(head)
    dropped: dict[str, list[str]] = {}
    for i, layer in enumerate(g.layers):
      if i in self.used or layer.type == 'Split':
        continue  # Splits are Caffe's plumbing (InsertSplits), not layers of the model
      if layer.type in _DATA:
        dropped.setdefault(DATA_LAYERS, []).append(layer.name)
      elif i in classifier_path:
        self.fail(
          i,
          f'{layer.type} layer on the path to the classifier that PSPNet does not '
          'compute there; the net differs from the released PSPNet',
        )
      else:
        dropped.setdefault(TRAINING_ONLY, []).append(layer.name)

    config = dict(
      LAYOUT.config,
      stride_in_1x1=stride_in_1x1,
      output_stride=out_stride,
      contract_dilation=contract,
      bins=bins,
      pyramid_fixed_size=size,
    )
    crop = (size - 1) * out_stride + 1
    notes = [
      f"input: RGB - {CAFFE_MEAN} (0-255), std 1; Caffe's BGR order folded into the "
      'first convolution (layer0.0)',
      f'pyramid: fixed AVE windows for {size}x{size} features (a {crop}x{crop} input), '
      f'bins {bins}; the Concat order [{", ".join(order)}] reordered',
    ]
    return Match(self.slots, config, self.head_input, dropped, notes, self.used, size)

  def stem(self):
    """Three 3x3 convs (+ BN, ReLU) from the input, then a 3x3/2 max pool (+1 padding)."""
    g = self.g
    firsts = [
      i
      for i, l in enumerate(g.layers)
      if l.type == 'Convolution'
      and all(d is None or g.layers[d].type in _DATA for d in g.inputs[i])
    ]
    if len(firsts) != 1:
      names = [g.layers[i].name for i in firsts]
      self.fail(None, f'expected one convolution reading the input image, found {names or "none"}')
    prev, in_ch = None, 3
    for k in range(3):
      i = firsts[0] if k == 0 else self.single_reader(prev, 'Convolution', 'the stem')
      if k:
        self.expect_input(i, prev, ('BN', 'ReLU'), f'stem conv {k + 1}')
      geo = self.conv_bn(
        i,
        f'layer0.{3 * k}',
        f'layer0.{3 * k + 1}',
        kernel=3,
        in_ch=in_ch,
        stride=2 if k == 0 else 1,
        dilation=1,
      )
      prev, in_ch = i, geo['out']
    pool = self.single_reader(prev, 'Pooling', 'the stem')
    self.expect_input(pool, prev, ('BN', 'ReLU'), 'stem max pool')
    got = _pooling(g.layers[pool])
    if got != ('MAX', 3, 2, 1):
      self.fail(
        pool,
        f"(method, kernel, stride, pad) {got}; PSPNet's stem pools MAX 3x3 with "
        'stride 2 and padding 1',
      )
    self.used.add(pool)
    self.channels[pool] = in_ch
    return pool

  def single_reader(self, i: int, kind: str, what: str) -> int:
    readers = [j for j in self.g.readers(i) if self.g.layers[j].type == kind]
    if len(readers) != 1:
      self.fail(i, f'{len(readers)} {kind} layers read it; {what} continues with one')
    return readers[0]

  def blocks(self, start: int) -> list[dict]:
    """Residual bottlenecks from the stem's output until no block follows."""
    g = self.g
    sums = [i for i, l in enumerate(g.layers) if l.type == 'Eltwise']
    blocks, x, x_kinds, x_ch = [], start, (), self.channels[start]
    while True:
      block = next((b for e in sums if (b := self.block(e, x, x_kinds, x_ch))), None)
      if block is None:
        break
      blocks.append(block)
      x, x_kinds, x_ch = block['sum'], ('ReLU',), block['out']
      # The ReLU after the sum.
      relu = [j for j in g.consumers[x] if g.layers[j].type == 'ReLU']
      if len(relu) != 1:
        self.fail(x, 'the sum of a residual block is not followed by one ReLU')
    if not blocks:
      self.fail(start, "no residual block reads the stem's output")
    return blocks

  def block(self, e: int, x: int, x_kinds, x_ch: int) -> dict | None:
    """The bottleneck summed by Eltwise ``e`` on input ``x``, or None if ``e`` is not one."""
    g = self.g
    if len(g.inputs[e]) != 2:
      return None
    branches = [g.trace(d) for d in g.inputs[e]]
    shortcut = residual = None
    for (s, kinds, _), (t, t_kinds, _) in (branches, branches[::-1]):
      if t is None or g.layers[t].type != 'Convolution' or _kinds(t_kinds) != ('BN',):
        continue
      if (s, _kinds(kinds)) == (x, x_kinds):
        shortcut, residual = None, t
      elif (
        s is not None
        and g.layers[s].type == 'Convolution'
        and _kinds(kinds) == ('BN',)
        and g.trace(g.inputs[s][0])[:2] == (x, x_kinds)
      ):
        shortcut, residual = s, t
      else:
        continue
      chain = [residual]
      for _ in range(2):
        src, kinds2, _ = g.input_of(chain[0])
        if src is None or g.layers[src].type != 'Convolution' or _kinds(kinds2) != ('BN', 'ReLU'):
          break
        chain.insert(0, src)
      if len(chain) == 3 and g.input_of(chain[0])[:2] == (x, x_kinds):
        break
      shortcut = residual = None
    if residual is None:
      return None
    op = g.layers[e].param('eltwise_param', 'operation')
    coeff = g.layers[e].param('eltwise_param', 'coeff')
    if op != 'SUM' or any(c != 1 for c in coeff):
      self.fail(e, f'Eltwise {op} with coefficients {coeff}; a residual block adds (SUM)')
    return {
      'sum': e,
      'chain': chain,
      'proj': shortcut,
      'in': x,
      'in_kinds': x_kinds,
      'in_ch': x_ch,
      'out': g.layers[chain[2]].param('convolution_param', 'num_output'),
    }

  def stages(self, blocks: list[dict]):
    """Groups blocks into stages (a projection starts one) and stores their tensors."""
    stages: list[list[dict]] = []
    for b in blocks:
      if b['proj'] is not None or not stages:
        stages.append([])
      stages[-1].append(b)
    if len(stages) != 4:
      end = blocks[-1]['sum']
      readers = ', '.join(repr(self.g.layers[j].name) for j in self.g.readers(end)) or 'none'
      self.fail(
        end,
        f'the residual blocks end here after {len(stages)} stages (a stage starts at '
        f'a projection shortcut), a ResNet has 4; is a layer missing? (it is read by '
        f'{readers})',
      )
    geometry, stride_in_1x1 = [], None
    for k, stage in enumerate(stages, start=1):
      dilations = []
      stride = 1
      for i, b in enumerate(stage):
        c1, c2, c3 = b['chain']
        p = f'layer{k}.{i}'
        g1 = self.conv_bn(c1, f'{p}.conv1', f'{p}.bn1', kernel=1, in_ch=b['in_ch'], dilation=1)
        g2 = self.conv_bn(c2, f'{p}.conv2', f'{p}.bn2', kernel=3, in_ch=g1['out'])
        g3 = self.conv_bn(
          c3, f'{p}.conv3', f'{p}.bn3', kernel=1, in_ch=g2['out'], stride=1, dilation=1
        )
        self.expect_input(c1, b['in'], b['in_kinds'], 'bottleneck first 1x1')
        self.expect_input(c2, c1, ('BN', 'ReLU'), 'bottleneck 3x3')
        self.expect_input(c3, c2, ('BN', 'ReLU'), 'bottleneck last 1x1')
        if g3['out'] != 4 * g1['out']:
          self.fail(
            c3,
            f'{g3["out"]} outputs for a bottleneck of width {g1["out"]}; a ResNet '
            f'bottleneck expands 4x ({4 * g1["out"]})',
          )
        if i == 0:
          stride = max(g1['stride'], g2['stride'])
          if min(g1['stride'], g2['stride']) != 1:
            self.fail(c2, 'both convolutions of a bottleneck are strided')
          if stride > 1:
            in_1x1 = g1['stride'] > 1
            if stride_in_1x1 not in (None, in_1x1):
              self.fail(
                c1, 'the stride sits on the 1x1 conv in one stage and on the 3x3 in another'
              )
            stride_in_1x1 = in_1x1
          if b['proj'] is None:
            self.fail(b['sum'], 'the first block of a stage has no projection shortcut')
          self.conv_bn(
            b['proj'],
            f'{p}.downsample.0',
            f'{p}.downsample.1',
            kernel=1,
            in_ch=b['in_ch'],
            stride=stride,
            dilation=1,
          )
          self.expect_input(b['proj'], b['in'], b['in_kinds'], 'projection shortcut')
        else:
          for geo, j in ((g1, c1), (g2, c2)):
            if geo['stride'] != 1:
              self.fail(j, f'stride {geo["stride"]} in a block after the first of its stage')
        dilations.append(g2['dilation'])
        self.used.add(b['sum'])
        for j in self.g.consumers[b['sum']]:
          if self.g.layers[j].type == 'ReLU':
            self.relu(j)
      usual = collections.Counter(dilations).most_common(1)[0][0]
      odd = next(((b, d) for b, d in zip(stage[1:], dilations[1:]) if d != usual), None)
      if odd is not None:
        self.fail(
          odd[0]['chain'][1], f"dilation {odd[1]} where the stage's other blocks have {usual}"
        )
      geometry.append((stride, dilations[0], dilations[-1]))
    return tuple(geometry), bool(stride_in_1x1)

  def pyramid(self, trunk: int, channels: int):
    """The AVE pools of the last block's output, their branches and the Concat: ``(bins,
    the features' size, the Concat's order of its inputs, the Concat)``."""
    g = self.g
    pools = [
      j
      for j in g.readers(trunk)
      if g.layers[j].type == 'Pooling' and _kinds(g.input_of(j)[1]) == ('ReLU',)
    ]
    if not pools:
      readers = ', '.join(repr(g.layers[j].name) for j in g.readers(trunk)) or 'none'
      self.fail(
        trunk,
        f'the residual blocks end here, and no pyramid pooling reads it (its '
        f'readers: {readers}); is a layer missing?',
      )
    branches, size, concat = {}, None, None
    for j in pools:
      b, n, conv, interp, joined = self.pyramid_branch(j)
      if size not in (None, n):
        self.fail(interp, f'resizes to {n}; another pyramid branch resizes to {size}')
      if b in branches:
        self.fail(j, f'a second pyramid branch of {b} bins')
      if concat not in (None, joined):
        self.fail(joined, 'a second Concat joins pyramid branches')
      size, concat, branches[b] = n, joined, (j, conv, interp)
    bins = tuple(sorted(branches))
    self.pyramid_convs([branches[b][1] for b in bins], channels)
    return bins, size, self.concat_order(concat, trunk, branches), concat

  def pyramid_branch(self, j: int):
    """One branch from its pool ``j``: pool -> conv -> BN -> ReLU -> Interp -> a Concat.
    ``(bins, the size it is resized to, conv, interp, the Concat)``."""
    g = self.g
    got = _pooling(g.layers[j])
    method, k, stride, pad = got
    if (method, stride, pad) != ('AVE', k, 0):
      self.fail(
        j,
        f"(method, kernel, stride, pad) {got}; PSPNet's pyramid pools AVE with "
        'stride = kernel and no padding',
      )
    self.used.add(j)
    conv = self.single_reader(j, 'Convolution', 'a pyramid branch')
    self.expect_input(conv, j, (), 'pyramid branch conv')
    interp = self.single_reader(conv, 'Interp', 'a pyramid branch')
    self.expect_input(interp, conv, ('BN', 'ReLU'), 'pyramid branch resize')
    il = g.layers[interp]
    n = il.param('interp_param', 'height')
    extra = [
      f for f in ('zoom_factor', 'shrink_factor', 'pad_beg', 'pad_end') if il.has('interp_param', f)
    ]
    if not il.has('interp_param', 'height') or il.param('interp_param', 'width') != n or extra:
      self.fail(
        interp,
        "resizes by other means than a fixed height = width; PSPNet's pyramid "
        "resizes each branch to the features' size",
      )
    if n % k:
      self.fail(j, f'kernel {k} does not divide the {n}x{n} features its branch is resized to')
    self.used.add(interp)
    readers = g.readers(interp)
    if len(readers) != 1 or g.layers[readers[0]].type != 'Concat':
      self.fail(interp, 'is not read by one Concat')
    return n // k, n, conv, interp, readers[0]

  def pyramid_convs(self, convs: list[int], channels: int):
    """The branches' conv + BN weights, in bin order (``ppm.features.<i>``): each
    ``channels / len(convs)`` outputs of the ``channels`` features."""
    reduction = None
    for index, conv in enumerate(convs):
      geo = self.conv_bn(
        conv,
        f'ppm.features.{index}.1',
        f'ppm.features.{index}.2',
        kernel=1,
        in_ch=channels,
        stride=1,
        dilation=1,
      )
      if reduction not in (None, geo['out']):
        self.fail(conv, f'{geo["out"]} outputs; another pyramid branch has {reduction}')
      reduction = geo['out']
    if reduction * len(convs) != channels:
      self.fail(
        convs[0],
        f'{reduction} outputs per branch for {len(convs)} branches of '
        f"{channels} features; PSPNet's branches have "
        f'{channels // len(convs)} ({channels} / {len(convs)})',
      )

  def concat_order(self, concat: int, trunk: int, branches: dict) -> tuple[str, ...]:
    """What the Concat joins, in its order: ``'features'`` and ``'bin <b>'`` each once."""
    g = self.g
    cl = g.layers[concat]
    axis = (
      cl.param('concat_param', 'axis')
      if cl.has('concat_param', 'axis')
      else cl.param('concat_param', 'concat_dim')
    )
    if axis != 1:
      self.fail(concat, f'concatenates along axis {axis}; PSPNet along channels (1)')
    order = []
    for d in g.inputs[concat]:
      s, kinds, _ = g.trace(d)
      if (s, _kinds(kinds)) == (trunk, ('ReLU',)):
        order.append('features')
      else:
        b = next((b for b, (_, _, interp) in branches.items() if (s, kinds) == (interp, ())), None)
        if b is None:
          self.fail(
            concat, f'joins {g.name(s)}, which is neither the features nor a pyramid branch'
          )
        order.append(f'bin {b}')
    if sorted(order) != sorted(['features'] + [f'bin {b}' for b in branches]):
      self.fail(concat, f'joins {order}; PSPNet joins the features and each branch once')
    self.used.add(concat)
    return tuple(order)

  def head(self, concat: int, channels: int, bins, order) -> int:
    """The 3x3 conv + BN + ReLU (+ Dropout) and the 1x1 classifier after the Concat."""
    conv = self.single_reader(concat, 'Convolution', 'the head')
    self.expect_input(conv, concat, (), 'head conv')
    reduction = channels // len(bins)
    in_ch = channels + reduction * len(bins)
    self.conv_bn(conv, 'cls.0', 'cls.1', kernel=3, in_ch=in_ch, stride=1, dilation=1)
    width = {'features': channels, **{f'bin {b}': reduction for b in bins}}
    self.head_input = tuple((name, width[name]) for name in order)
    classifier = self.single_reader(conv, 'Convolution', 'the head')
    self.expect_input(classifier, conv, ('BN', 'ReLU'), 'classifier')
    self.conv(
      classifier, 'cls.4', kernel=1, in_ch=self.channels[conv], bias=True, stride=1, dilation=1
    )
    return classifier

  def zoom(self, classifier: int, out_stride: int):
    """The deploy nets end with an Interp of zoom_factor 8 (a training net may not: other
    readers of the logits are training-only and dropped)."""
    g = self.g
    for j in g.readers(classifier):
      layer = g.layers[j]
      if layer.type != 'Interp' or not layer.has('interp_param', 'zoom_factor'):
        continue
      others = [
        f
        for f in ('height', 'width', 'shrink_factor', 'pad_beg', 'pad_end')
        if layer.has('interp_param', f)
      ]
      zoom = layer.param('interp_param', 'zoom_factor')
      if others or zoom != out_stride:
        self.fail(
          j,
          f'resizes the logits by zoom_factor {zoom} (and {others or "nothing else"}); '
          f'pspnet_jax resizes them to the input size ((h - 1) * {out_stride} + 1 for the '
          f'{out_stride}k + 1 inputs the net runs at), which is zoom_factor {out_stride}',
        )
      self.used.add(j)


def _pooling(layer: Layer):
  """(method, kernel, stride, pad) of a square Pooling layer; None where not square."""
  p = lambda f: layer.param('pooling_param', f)
  if p('global_pooling'):
    return (p('pool'), 'global', 1, 0)
  square = lambda a, h, w: a if a else (h if h == w else None)
  kernel = square(p('kernel_size'), p('kernel_h'), p('kernel_w'))
  stride = p('stride_h') if layer.has('pooling_param', 'stride_h') else p('stride')
  if layer.has('pooling_param', 'stride_h') and p('stride_h') != p('stride_w'):
    stride = None
  pad = square(p('pad'), p('pad_h'), p('pad_w'))
  return (p('pool'), kernel, stride, pad)


def _one(values, h, w, default, reader, i, what):
  """A square conv parameter from its repeated field or its _h/_w fields."""
  values = list(values) if values else []
  if h or w:
    values = [h, w]
  if not values:
    if default is None:
      reader.fail(i, f'no {what}')
    return default
  if len(set(values)) != 1:
    reader.fail(i, f"{what} {values}: PSPNet's convolutions are square")
  return int(values[0])


def match(graph: LayerGraph) -> Match:
  """The graph -> where each module of the model sits and the config fields the graph fixes
  (layer parameters only); ``PortError`` names the layer that does not fit."""
  return _Matcher(graph).match()


def head_input_order(head_input: tuple[tuple[str, int], ...]) -> np.ndarray:
  """The head conv's input channels in pspnet_jax's order ``[features, bin 1, bin 2, ...]``
  as indices into Caffe's, whose Concat joins ``head_input`` ((name, channels), in order)."""
  start, offsets = 0, {}
  for name, width in head_input:
    offsets[name] = (start, width)
    start += width
  bins = sorted((n for n, _ in head_input if n != 'features'), key=lambda n: int(n.split()[1]))
  return np.concatenate([np.arange(offsets[n][0], sum(offsets[n])) for n in ['features'] + bins])


def take_weights(graph: LayerGraph, found: Match) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The matched layers' blobs -> the canonical state dict and, per key, the file's
  ``'layer name blob i'``. Blobs are checked against the shapes the match expects; the
  first conv's input channels go BGR -> RGB and the head conv's to pspnet_jax's order."""
  for i, layer in enumerate(graph.layers):
    if layer.blobs and layer.type not in ('Convolution', 'BN'):
      _fail(graph, i, f'holds {len(layer.blobs)} blobs; a {layer.type} layer has none')
  canonical, file_keys = {}, {}
  for prefix, slot in found.slots.items():
    take = _conv_blobs if slot.kind == 'conv' else _bn_blobs
    for name, k, value in take(graph, slot):
      canonical[f'{prefix}.{name}'] = value
      file_keys[f'{prefix}.{name}'] = f'{graph.layers[slot.layer].name} blob {k}'
  # The first conv sees BGR: reversing its input channels makes it take RGB.
  canonical['layer0.0.weight'] = np.ascontiguousarray(canonical['layer0.0.weight'][:, ::-1])
  canonical['cls.0.weight'] = np.ascontiguousarray(
    canonical['cls.0.weight'][:, head_input_order(found.head_input)]
  )
  return canonical, file_keys


def _conv_blobs(graph: LayerGraph, slot: Slot):
  blobs, out, in_ch = graph.layers[slot.layer].blobs, slot.shape[0], slot.shape[1]
  n = 2 if slot.bias else 1
  if len(blobs) != n:
    _fail(
      graph,
      slot.layer,
      f'holds {len(blobs)} blobs; a convolution with bias_term '
      f'{str(slot.bias).lower()} holds {n} (weights{", bias" if n == 2 else ""})',
    )
  if blobs[0].shape != slot.shape:
    _fail(
      graph,
      slot.layer,
      f'blob 0 (weights) has shape {blobs[0].shape}; its convolution_param '
      f'and its input ({in_ch} channels) give {slot.shape}',
    )
  yield 'weight', 0, blobs[0]
  if n == 2:
    if blobs[1].shape not in ((out,), (1, 1, 1, out)):
      _fail(graph, slot.layer, f'blob 1 (bias) has shape {blobs[1].shape}, expected ({out},)')
    yield 'bias', 1, blobs[1].reshape(-1)


def _bn_blobs(graph: LayerGraph, slot: Slot):
  blobs, (channels,) = graph.layers[slot.layer].blobs, slot.shape
  if len(blobs) != 4:
    _fail(
      graph,
      slot.layer,
      f'holds {len(blobs)} blobs; the BN layer holds 4 (slope, bias, mean, variance)',
    )
  names = ('weight', 'bias', 'running_mean', 'running_var')
  for k, (blob, name) in enumerate(zip(blobs, names)):
    if blob.shape not in ((1, channels, 1, 1), (channels,)):
      _fail(
        graph,
        slot.layer,
        f'blob {k} ({("slope", "bias", "mean", "variance")[k]}) has shape '
        f'{blob.shape}; the convolution before it gives (1, {channels}, 1, 1)',
      )
    yield name, k, blob.reshape(-1)


def read_net(net: Net) -> CaffeNet:
  """The file's layers -> canonical tensors and config fields (layer graph, match, weights);
  ``PortError`` names the layer when something does not fit (missing or extra blobs, wrong
  shapes, unknown types, parameters PSPNet does not compute)."""
  graph = LayerGraph(net)
  found = match(graph)
  canonical, file_keys = take_weights(graph, found)
  names = {graph.layers[i].name for i in found.used}
  return CaffeNet(
    canonical, file_keys, found.config, found.dropped, found.notes, names, found.feature_size
  )


def check_prototxt(net: Net, deploy: Net, read: CaffeNet, out_stride: int):
  """Checks a deploy prototxt against the file: every layer it has is in the file, of the
  same type, reading and writing the same blobs (Splits followed), with the same
  parameters; every layer the model computes is in it; its input size gives the features
  the pyramid is sized for."""
  src, txt = net.source, deploy.source
  file_layers = {l.name: l for l in net.layers}
  original = {}  # a Split's top -> the blob it copies
  for layer in net.layers:
    if layer.type == 'Split':
      for top in layer.tops:
        original[top] = original.get(layer.bottoms[0], layer.bottoms[0])
  names = set()
  for layer in deploy.layers:
    names.add(layer.name)
    if layer.type in _DATA:
      continue
    got = file_layers.get(layer.name)
    if got is None:
      raise PortError(f'{txt}: layer {layer.name!r} ({layer.type}) is not in {src}')
    if got.type != layer.type:
      raise PortError(f'{txt}: layer {layer.name!r} is a {layer.type}, in {src} a {got.type}')
    bottoms = [original.get(b, b) for b in got.bottoms]
    if bottoms != layer.bottoms or got.tops != layer.tops:
      raise PortError(
        f'{txt}: layer {layer.name!r} maps {layer.bottoms} -> {layer.tops}; in '
        f'{src} {bottoms} -> {got.tops}'
      )
    for message in set(layer.params) | set(got.params):
      fields = set(layer.params.get(message, {})) | set(got.params.get(message, {}))
      if message == 'interp_param' and set(layer.params.get(message, {})) != set(
        got.params.get(message, {})
      ):
        raise PortError(
          f'{txt}: layer {layer.name!r} sets interp_param '
          f'{sorted(layer.params.get(message, {}))}, {src} {sorted(got.params.get(message, {}))}'
        )
      for field in sorted(fields):
        if message == 'bn_param' and field in ('momentum', 'frozen'):
          continue  # training settings
        a, b = layer.param(message, field), got.param(message, field)
        if a != b and not (isinstance(a, float) and np.float32(a) == np.float32(b)):
          raise PortError(
            f'{txt}: layer {layer.name!r}: {message}.{field} is {a} here and {b} in {src}'
          )
  missing = sorted(read.used - names)
  if missing:
    raise PortError(
      f"{txt}: has no layers {missing[:5]} of {src}'s network; is it the prototxt of this model?"
    )
  for shape in deploy.input_shapes:
    if len(shape) == 4:
      features = (shape[2] - 1) // out_stride + 1
      if shape[2] != shape[3] or features != read.feature_size:
        raise PortError(
          f'{txt}: input {shape[2]}x{shape[3]} gives {features}x{features} '
          f'features, but the pyramid is sized for {read.feature_size}x'
          f'{read.feature_size}'
        )
