"""An independent Caffe for the tests, written from the sources of the authors' fork
(github.com/hszhao/PSPNet at commit 798bdc9); nothing here imports pspnet_jax.

- ``pspnet_net``: the released nets as layer lists, named and wired as
  ``evaluation/prototxt/pspnet{50,101}_*.prototxt`` (optionally narrower), with random
  weights and BN statistics measured on an image (``calibrate``), so activations stay of
  order one as in a trained net.
- ``as_training_net``: the same with what a file saved from a training net adds around it:
  a data layer, a training-only auxiliary classifier, loss layers, no final Interp.
- ``write_caffemodel``: a binary ``NetParameter`` as ``Net::ToProto`` writes it (layers
  after ``InsertSplits``, each blob's ``shape`` and packed ``data``); the messages are built
  with the protobuf runtime from a schema declared here (field numbers of
  ``src/caffe/proto/caffe.proto``), the float data appended as its packed field.
- ``forward``: the layers run one by one in NumPy (convolutions in torch) as
  ``src/caffe/layers/*.cpp`` compute them: ``BN`` with its moving statistics, ``Pooling``
  rounding up with clipped windows, ``Interp`` with Caffe's float32 coordinates.
- ``caffe_input``: ``evaluation/pre_img.m``: RGB minus the mean, channels reversed to BGR.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CAFFE_MEAN = np.array([123.68, 116.779, 103.939], np.float32)  # eval_all.m, RGB
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# ---- the schema: the messages PSPNet's files use, caffe.proto's numbers ------------------

_T = descriptor_pb2.FieldDescriptorProto
_MESSAGES = {
  'BlobShape': [('dim', 1, _T.TYPE_INT64, True)],
  'BlobProto': [('data', 5, _T.TYPE_FLOAT, True), ('shape', 7, 'BlobShape', False)],
  'FillerParameter': [('type', 1, _T.TYPE_STRING, False), ('value', 2, _T.TYPE_FLOAT, False)],
  'ParamSpec': [('lr_mult', 3, _T.TYPE_FLOAT, False), ('decay_mult', 4, _T.TYPE_FLOAT, False)],
  'ConvolutionParameter': [
    ('num_output', 1, _T.TYPE_UINT32, False),
    ('bias_term', 2, _T.TYPE_BOOL, False),
    ('pad', 3, _T.TYPE_UINT32, True),
    ('kernel_size', 4, _T.TYPE_UINT32, True),
    ('stride', 6, _T.TYPE_UINT32, True),
    ('weight_filler', 7, 'FillerParameter', False),
    ('dilation', 18, _T.TYPE_UINT32, True),
  ],
  'PoolingParameter': [
    ('pool', 1, 'PoolMethod', False),
    ('kernel_size', 2, _T.TYPE_UINT32, False),
    ('stride', 3, _T.TYPE_UINT32, False),
    ('pad', 4, _T.TYPE_UINT32, False),
  ],
  'InterpParameter': [
    ('height', 1, _T.TYPE_INT32, False),
    ('width', 2, _T.TYPE_INT32, False),
    ('zoom_factor', 3, _T.TYPE_INT32, False),
    ('shrink_factor', 4, _T.TYPE_INT32, False),
  ],
  'ConcatParameter': [('axis', 2, _T.TYPE_INT32, False)],
  'EltwiseParameter': [('operation', 1, 'EltwiseOp', False)],
  'DropoutParameter': [('dropout_ratio', 1, _T.TYPE_FLOAT, False)],
  'BNParameter': [
    ('slope_filler', 1, 'FillerParameter', False),
    ('bias_filler', 2, 'FillerParameter', False),
    ('momentum', 3, _T.TYPE_FLOAT, False),
    ('eps', 4, _T.TYPE_FLOAT, False),
    ('frozen', 5, _T.TYPE_BOOL, False),
  ],
  'LossParameter': [('ignore_label', 1, _T.TYPE_INT32, False)],
  'LayerParameter': [
    ('name', 1, _T.TYPE_STRING, False),
    ('type', 2, _T.TYPE_STRING, False),
    ('bottom', 3, _T.TYPE_STRING, True),
    ('top', 4, _T.TYPE_STRING, True),
    ('loss_weight', 5, _T.TYPE_FLOAT, True),
    ('param', 6, 'ParamSpec', True),
    ('blobs', 7, 'BlobProto', True),
    ('phase', 10, 'Phase', False),
    ('loss_param', 101, 'LossParameter', False),
    ('concat_param', 104, 'ConcatParameter', False),
    ('convolution_param', 106, 'ConvolutionParameter', False),
    ('dropout_param', 108, 'DropoutParameter', False),
    ('eltwise_param', 110, 'EltwiseParameter', False),
    ('pooling_param', 121, 'PoolingParameter', False),
    ('interp_param', 143, 'InterpParameter', False),
    ('bn_param', 152, 'BNParameter', False),
  ],
  'NetParameter': [
    ('name', 1, _T.TYPE_STRING, False),
    ('input', 3, _T.TYPE_STRING, True),
    ('layer', 100, 'LayerParameter', True),
  ],
}
_ENUMS = {
  'PoolMethod': ['MAX', 'AVE', 'STOCHASTIC'],
  'EltwiseOp': ['PROD', 'SUM', 'MAX'],
  'Phase': ['TRAIN', 'TEST'],
}


def _classes():
  fdp = descriptor_pb2.FileDescriptorProto(
    name='caffe_reference_subset.proto', package='caffe_ref', syntax='proto2'
  )
  for name, values in _ENUMS.items():
    enum = fdp.enum_type.add(name=name)
    for number, value in enumerate(values):
      enum.value.add(name=f'{name}_{value}', number=number)
  for name, fields in _MESSAGES.items():
    msg = fdp.message_type.add(name=name)
    for fname, number, kind, repeated in fields:
      f = msg.field.add(
        name=fname, number=number, label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
      )
      if isinstance(kind, str):
        f.type = _T.TYPE_ENUM if kind in _ENUMS else _T.TYPE_MESSAGE
        f.type_name = f'.caffe_ref.{kind}'
      else:
        f.type = kind
      if repeated and kind in (_T.TYPE_FLOAT, _T.TYPE_INT64, _T.TYPE_UINT32):
        f.options.packed = True  # [packed = true] in caffe.proto (pad etc. are not; harmless)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return {
    name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'caffe_ref.{name}'))
    for name in _MESSAGES
  }


PROTO = _classes()

# ---- the nets ----------------------------------------------------------------------------


def _layer(name, type_, bottom, top, **params):
  return {
    'name': name,
    'type': type_,
    'bottom': list(bottom),
    'top': list(top),
    'params': params,
    'blobs': [],
  }


def pspnet_net(
  depth: int, num_classes: int, crop: int, *, width: int = 64, head: int = 512, seed: int = 0
) -> list[dict]:
  """The deploy net of ``pspnet{depth}_*_{crop}.prototxt`` at ``width`` / 64 of its widths
  (``head`` channels after the pyramid), random weights, BN statistics not yet set."""
  rng = np.random.default_rng(seed)
  layers = []

  def conv(name, bottom, cin, cout, k, stride=1, dilation=1, bias=False):
    layer = _layer(
      name,
      'Convolution',
      [bottom],
      [name],
      convolution_param=dict(
        num_output=cout,
        pad=[dilation * (k // 2)] if k > 1 else [0],
        kernel_size=[k],
        stride=[stride],
        bias_term=bias,
        **({'dilation': [dilation]} if dilation > 1 else {}),
      ),
    )
    std = np.sqrt(2.0 / (cin * k * k))
    layer['blobs'] = [(rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)]
    if bias:
      layer['blobs'].append((rng.standard_normal(cout) * 0.1).astype(np.float32))
    layers.append(layer)

  def bn(name, c, slope=(0.5, 1.5)):
    layer = _layer(f'{name}/bn', 'BN', [name], [name], bn_param=dict(frozen=True, momentum=0.95))
    layer['blobs'] = [
      rng.uniform(*slope, (1, c, 1, 1)).astype(np.float32),
      (rng.standard_normal((1, c, 1, 1)) * 0.2).astype(np.float32),
      np.zeros((1, c, 1, 1), np.float32),
      np.ones((1, c, 1, 1), np.float32),
    ]
    layers.append(layer)

  def relu(name):
    layers.append(_layer(f'{name}/relu', 'ReLU', [name], [name]))

  def conv_bn_relu(name, bottom, cin, cout, k, stride=1, dilation=1, act=True):
    conv(name, bottom, cin, cout, k, stride, dilation)
    # A trained ResNet's residual branches end small (their last BN's slope), which keeps
    # a deep random net from amplifying rounding differences (1e-7 -> 1e-4 at U(0.5, 1.5)).
    bn(name, cout, (0.1, 0.4) if name.endswith('_increase') else (0.5, 1.5))
    if act:
      relu(name)

  w = width
  conv_bn_relu('conv1_1_3x3_s2', 'data', 3, w, 3, stride=2)
  conv_bn_relu('conv1_2_3x3', 'conv1_1_3x3_s2', w, w, 3)
  conv_bn_relu('conv1_3_3x3', 'conv1_2_3x3', w, 2 * w, 3)
  layers.append(
    _layer(
      'pool1_3x3_s2',
      'Pooling',
      ['conv1_3_3x3'],
      ['pool1_3x3_s2'],
      pooling_param=dict(pool='MAX', kernel_size=3, stride=2, pad=1),
    )
  )
  x, cin = 'pool1_3x3_s2', 2 * w
  for stage, n in zip((2, 3, 4, 5), BLOCKS[depth]):
    planes = w * 2 ** (stage - 2)
    dilation = {4: 2, 5: 4}.get(stage, 1)
    for b in range(1, n + 1):
      name = f'conv{stage}_{b}'
      stride = 2 if stage == 3 and b == 1 else 1
      conv_bn_relu(f'{name}_1x1_reduce', x, cin, planes, 1, stride=stride)
      conv_bn_relu(f'{name}_3x3', f'{name}_1x1_reduce', planes, planes, 3, dilation=dilation)
      conv_bn_relu(f'{name}_1x1_increase', f'{name}_3x3', planes, 4 * planes, 1, act=False)
      if b == 1:
        conv_bn_relu(f'{name}_1x1_proj', x, cin, 4 * planes, 1, stride=stride, act=False)
        shortcut = f'{name}_1x1_proj'
      else:
        shortcut = x
      layers.append(
        _layer(
          name,
          'Eltwise',
          [shortcut, f'{name}_1x1_increase'],
          [name],
          eltwise_param=dict(operation='SUM'),
        )
      )
      relu(name)
      x, cin = name, 4 * planes
  features = (crop - 1) // 8 + 1
  branches = []
  for b in (1, 2, 3, 6):
    pool = f'{x}_pool{b}'
    layers.append(
      _layer(
        pool,
        'Pooling',
        [x],
        [pool],
        pooling_param=dict(pool='AVE', kernel_size=features // b, stride=features // b),
      )
    )
    conv_bn_relu(f'{pool}_conv', pool, cin, cin // 4, 1)
    layers.append(
      _layer(
        f'{pool}_interp',
        'Interp',
        [f'{pool}_conv'],
        [f'{pool}_interp'],
        interp_param=dict(height=features, width=features),
      )
    )
    branches.append(f'{pool}_interp')
  concat = f'{x}_concat'
  layers.append(_layer(concat, 'Concat', [x] + branches[::-1], [concat]))
  conv_bn_relu('conv5_4', concat, 2 * cin, head, 3)
  layers.append(
    _layer(
      'conv5_4/dropout', 'Dropout', ['conv5_4'], ['conv5_4'], dropout_param=dict(dropout_ratio=0.1)
    )
  )
  conv('conv6', 'conv5_4', head, num_classes, 1, bias=True)
  layers.append(
    _layer('conv6_interp', 'Interp', ['conv6'], ['conv6_interp'], interp_param=dict(zoom_factor=8))
  )
  return layers


def as_training_net(layers: list[dict], num_classes: int, seed: int = 1) -> list[dict]:
  """What a file saved from a training net holds besides: a data layer, a training-only
  auxiliary classifier on the last conv4 block, loss layers, and no final Interp."""
  rng = np.random.default_rng(seed)
  out = [_layer('data', 'ImageSegData', [], ['data', 'label'])]
  out += [copy.copy(l) for l in layers if l['name'] != 'conv6_interp']
  last4 = [l['name'] for l in layers if l['type'] == 'Eltwise' and l['name'].startswith('conv4_')][
    -1
  ]
  at = next(i for i, l in enumerate(out) if l['name'] == f'{last4}/relu') + 1
  channels = next(l for l in layers if l['name'] == f'{last4}_1x1_increase')['params'][
    'convolution_param'
  ]['num_output']
  aux = _layer(
    'conv_aux',
    'Convolution',
    [last4],
    ['conv_aux'],
    convolution_param=dict(num_output=num_classes, kernel_size=[1], bias_term=True),
  )
  aux['blobs'] = [
    rng.standard_normal((num_classes, channels, 1, 1)).astype(np.float32),
    np.zeros(num_classes, np.float32),
  ]
  out.insert(at, aux)
  out += [
    _layer(
      'label_shrink', 'Interp', ['label'], ['label_shrink'], interp_param=dict(shrink_factor=8)
    ),
    _layer(
      'loss',
      'SoftmaxWithLoss',
      ['conv6', 'label_shrink'],
      ['loss'],
      loss_param=dict(ignore_label=255),
    ),
    _layer(
      'loss_aux',
      'SoftmaxWithLoss',
      ['conv_aux', 'label_shrink'],
      ['loss_aux'],
      loss_weight=[0.4],
      loss_param=dict(ignore_label=255),
    ),
  ]
  for l in out:
    l['phase'] = 'TRAIN'
  return out


# ---- Caffe's InsertSplits and the binary file --------------------------------------------


def insert_splits(layers: list[dict], inputs=()) -> list[dict]:
  """``util/insert_splits.cpp``: a blob read by several layers is copied by a Split layer
  named ``{blob}_{layer}_{index}_split`` into ``{blob}_{layer}_{index}_split_{k}``."""
  last_top, count = {b: (-1, 0) for b in inputs}, {}
  for i, l in enumerate(layers):
    for b in l['bottom']:
      count[last_top[b]] = count.get(last_top[b], 0) + 1
    for j, t in enumerate(l['top']):
      last_top[t] = (i, j)
  last_top, used, out = {b: (-1, 0) for b in inputs}, {}, []

  def split(producer_name, blob, j, n):
    return _layer(
      f'{blob}_{producer_name}_{j}_split',
      'Split',
      [blob],
      [f'{blob}_{producer_name}_{j}_split_{k}' for k in range(n)],
    )

  names = {-1: 'input'}
  for b in inputs:
    if count.get((-1, 0), 0) > 1:
      out.append(split('input', b, 0, count[(-1, 0)]))
  for i, l in enumerate(layers):
    names[i] = l['name']
    l = dict(l, bottom=list(l['bottom']))
    for k, b in enumerate(l['bottom']):
      src = last_top[b]
      if count[src] > 1:
        l['bottom'][k] = f'{b}_{names[src[0]]}_{src[1]}_split_{used.get(src, 0)}'
        used[src] = used.get(src, 0) + 1
    out.append(l)
    for j, t in enumerate(l['top']):
      last_top[t] = (i, j)
      if count.get((i, j), 0) > 1:
        out.append(split(l['name'], t, j, count[(i, j)]))
  return out


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b, n = n & 0x7F, n >> 7
    out.append(b | 0x80 if n else b)
    if not n:
      return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def blob_bytes(array: np.ndarray) -> bytes:
  """A BlobProto: ``data`` (5, packed floats) then ``shape`` (7), protobuf's field order."""
  data = np.ascontiguousarray(array, '<f4').tobytes()
  shape = PROTO['BlobProto'](shape=PROTO['BlobShape'](dim=list(array.shape))).SerializeToString()
  return _length_delimited(5, data) + shape


def layer_bytes(layer: dict) -> bytes:
  """Fields 1-6 (names, blobs' names, param specs), then the blobs (7), then the rest."""
  low = PROTO['LayerParameter'](
    name=layer['name'],
    type=layer['type'],
    bottom=layer['bottom'],
    top=layer['top'],
    loss_weight=layer['params'].get('loss_weight', []),
  )
  if layer['type'] in ('Convolution', 'BN'):
    for _ in range(len(layer['blobs'])):
      low.param.add(lr_mult=1, decay_mult=1)
  high = PROTO['LayerParameter']()
  if layer.get('phase'):
    high.phase = (
      PROTO['LayerParameter']
      .DESCRIPTOR.fields_by_name['phase']
      .enum_type.values_by_name[f'Phase_{layer["phase"]}']
      .number
    )
  for key, fields in layer['params'].items():
    if key == 'loss_weight':
      continue
    message = getattr(high, key)
    message.SetInParent()
    for fname, value in fields.items():
      field = message.DESCRIPTOR.fields_by_name[fname]
      if field.enum_type is not None:
        value = field.enum_type.values_by_name[f'{field.enum_type.name}_{value}'].number
      if isinstance(value, list):
        getattr(message, fname).extend(value)
      else:
        setattr(message, fname, value)
    if key == 'convolution_param':
      message.weight_filler.type = 'msra'  # as the prototxts; Caffe keeps it in the file
    if key == 'bn_param':
      message.slope_filler.type, message.slope_filler.value = 'constant', 1
  blobs = b''.join(_length_delimited(7, blob_bytes(b)) for b in layer['blobs'])
  return low.SerializeToString() + blobs + high.SerializeToString()


def write_caffemodel(path, layers: list[dict], name: str = 'pspnet', inputs=()) -> str:
  """Writes ``layers`` (after ``insert_splits``) as ``Net::ToProto`` + ``WriteProtoToBinaryFile``
  does: the net's name, its input names (no ``input_dim``), then each layer (field 100)."""
  head = PROTO['NetParameter'](name=name, input=list(inputs)).SerializeToString()
  with open(path, 'wb') as f:
    f.write(head)
    for layer in layers:
      f.write(_length_delimited(100, layer_bytes(layer)))
  return str(path)


def write_prototxt(path, layers: list[dict], crop: int, name: str = 'pspnet') -> str:
  """The deploy prototxt of ``layers`` (no blobs), with ``input_dim`` as the released ones."""
  lines = [
    f'name: "{name}"',
    'input: "data"',
    'input_dim: 1',
    'input_dim: 3',
    f'input_dim: {crop}',
    f'input_dim: {crop}',
  ]

  def value(v):
    if isinstance(v, bool):
      return 'true' if v else 'false'
    if isinstance(v, str):
      return v  # enums
    return str(v)

  for l in layers:
    lines += ['layer {', f'  name: "{l["name"]}"', f'  type: "{l["type"]}"']
    lines += [f'  bottom: "{b}"' for b in l['bottom']] + [f'  top: "{t}"' for t in l['top']]
    for _ in range(len(l['blobs'])):
      lines += ['  param {', '    lr_mult: 1', '    decay_mult: 1', '  }']
    for key, fields in l['params'].items():
      lines.append(f'  {key} {{')
      for fname, v in fields.items():
        lines += [f'    {fname}: {value(x)}' for x in (v if isinstance(v, list) else [v])]
      lines.append('  }')
    lines.append('}')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


# ---- the forward pass ----------------------------------------------------------------------


def caffe_input(rgb: np.ndarray) -> np.ndarray:
  """[B, H, W, 3] RGB 0-255 -> Caffe's data blob [B, 3, H, W]: minus the mean, BGR."""
  x = np.asarray(rgb, np.float32) - CAFFE_MEAN
  return np.ascontiguousarray(x[..., ::-1].transpose(0, 3, 1, 2))


def _convolution(layer, x):
  p = layer['params']['convolution_param']
  w = torch.from_numpy(layer['blobs'][0])
  b = torch.from_numpy(layer['blobs'][1]) if p.get('bias_term', True) else None
  y = F.conv2d(
    torch.from_numpy(x),
    w,
    b,
    stride=p.get('stride', [1])[0],
    padding=p.get('pad', [0])[0],
    dilation=p.get('dilation', [1])[0],
  )
  return y.numpy()


def _bn(layer, x, eps=1e-5):
  slope, bias, mean, var = layer['blobs']
  inv_std = np.power(var + np.float32(eps), np.float32(-0.5)).astype(np.float32)
  return ((x - mean) * inv_std * slope + bias).astype(np.float32)


def pooling(layer, x):
  """``PoolingLayer::Forward_cpu``: output size rounded up (and clipped when padded)."""
  p = layer['params']['pooling_param']
  k, s, pad = p['kernel_size'], p.get('stride', 1), p.get('pad', 0)
  n, c, h, w = x.shape
  ph = int(np.ceil((h + 2 * pad - k) / s)) + 1
  pw = int(np.ceil((w + 2 * pad - k) / s)) + 1
  if pad:
    if (ph - 1) * s >= h + pad:
      ph -= 1
    if (pw - 1) * s >= w + pad:
      pw -= 1
  out = np.zeros((n, c, ph, pw), np.float32)
  for i in range(ph):
    for j in range(pw):
      hs, ws = i * s - pad, j * s - pad
      if p['pool'] == 'MAX':
        he, we = min(hs + k, h), min(ws + k, w)
        hs, ws = max(hs, 0), max(ws, 0)
        out[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
      else:
        he, we = min(hs + k, h + pad), min(ws + k, w + pad)
        size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        out[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3), dtype=np.float32) / np.float32(
          size
        )
  return out


def interp_size(layer, h, w):
  p = layer['params']['interp_param']
  if 'zoom_factor' in p:
    z = p['zoom_factor']
    return h + (h - 1) * (z - 1), w + (w - 1) * (z - 1)
  if 'shrink_factor' in p:
    return (h - 1) // p['shrink_factor'] + 1, (w - 1) // p['shrink_factor'] + 1
  return p['height'], p['width']


def interp(x, out_h, out_w):
  """``caffe_cpu_interp2``: float32 ratio (in - 1) / (out - 1), coordinate ratio * index."""
  n, c, h1, w1 = x.shape
  if (h1, w1) == (out_h, out_w):
    return x.copy()

  def taps(n_in, n_out):
    r = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = (r * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    i0 = src.astype(np.int64)
    step = (i0 < n_in - 1).astype(np.int64)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i0 + step, np.float32(1) - lam1, lam1

  r0, r1, a0, a1 = taps(h1, out_h)
  c0, c1, b0, b1 = taps(w1, out_w)
  top = x[:, :, r0][:, :, :, c0] * b0 + x[:, :, r0][:, :, :, c1] * b1
  bottom = x[:, :, r1][:, :, :, c0] * b0 + x[:, :, r1][:, :, :, c1] * b1
  return (a0[:, None] * top + a1[:, None] * bottom).astype(np.float32)


def forward(
  layers: list[dict], data: np.ndarray, *, calibrate: bool = False, until: str | None = None
) -> dict[str, np.ndarray]:
  """Runs ``layers`` on ``data`` ([B, 3, H, W], ``caffe_input``); returns every blob.

  calibrate: before each BN runs, set its moving mean and variance to its input's
  per-channel statistics over the batch, perturbed (mean + N(0, 0.05) std, variance x
  U(0.8, 1.25), at least 0.01), as a trained net's statistics of its data would be.
  until: stop after this layer. Data and loss layers are skipped.
  """
  rng = np.random.default_rng(7)
  blobs = {'data': np.asarray(data, np.float32)}
  for layer in layers:
    t, bottoms = layer['type'], [blobs.get(b) for b in layer['bottom']]
    if t in ('ImageSegData', 'SoftmaxWithLoss') or any(b is None for b in bottoms):
      continue
    x = bottoms[0] if bottoms else None
    if t == 'Convolution':
      y = _convolution(layer, x)
    elif t == 'BN':
      if calibrate:
        c = x.shape[1]
        var = x.var(axis=(0, 2, 3))
        mean = x.mean(axis=(0, 2, 3)) + rng.standard_normal(c) * 0.05 * np.sqrt(var)
        var = np.maximum(var * rng.uniform(0.8, 1.25, c), 0.01)
        layer['blobs'][2] = mean.reshape(1, c, 1, 1).astype(np.float32)
        layer['blobs'][3] = var.reshape(1, c, 1, 1).astype(np.float32)
      y = _bn(layer, x)
    elif t == 'ReLU':
      y = np.maximum(x, np.float32(0))
    elif t == 'Pooling':
      y = pooling(layer, x)
    elif t == 'Eltwise':
      y = bottoms[0] + bottoms[1]
    elif t == 'Concat':
      y = np.concatenate(bottoms, axis=1)
    elif t == 'Interp':
      y = interp(x, *interp_size(layer, *x.shape[2:]))
    elif t in ('Dropout', 'Split'):
      y = x
    else:
      raise NotImplementedError(t)
    for top in layer['top']:
      blobs[top] = y
    if layer['name'] == until:
      break
  return blobs
