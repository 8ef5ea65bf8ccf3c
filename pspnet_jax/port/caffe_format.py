"""Reads the authors' Caffe files without Caffe: a binary ``.caffemodel`` and a text
``.prototxt``, both a ``NetParameter``, into plain layers (name, type, bottoms, tops,
parameters, blobs as NumPy arrays).

The one place that touches Caffe files. The schema is the part of
``src/caffe/proto/caffe.proto`` of the authors' Caffe (github.com/hszhao/PSPNet at commit
798bdc9) that PSPNet's layers use, with that file's field numbers and defaults; every other
field is skipped. The binary file is decoded with a small protobuf wire-format reader (no
protobuf runtime): blobs' packed floats become NumPy views of the memory-mapped file, so
a 270 MB file is not copied while it is read. Text files are tokenised here too.

Parameters keep protobuf's presence: ``layer.param('interp_param', 'zoom_factor')`` is the
value in the file, or the schema default when absent; ``layer.has(...)`` tells which (the
``Interp`` layer's output size depends on which fields are present).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
from typing import Any

import numpy as np

from pspnet_jax.port.mapping import PortError

# kind: 'int' (varint: int32, uint32, int64), 'bool', 'float' (fixed32), 'double' (fixed64),
# 'string', an enum's value names, or a message's name.
_Field = tuple[str, Any, bool, Any]  # (name, kind, repeated, default)

POOL_METHODS = ('MAX', 'AVE', 'STOCHASTIC')
ELTWISE_OPS = ('PROD', 'SUM', 'MAX')
PHASES = ('TRAIN', 'TEST')

SCHEMA: dict[str, dict[int, _Field]] = {
  'NetParameter': {
    1: ('name', 'string', False, ''),
    2: ('layers', 'V1LayerParameter', True, None),  # the pre-2015 format: refused
    3: ('input', 'string', True, None),
    4: ('input_dim', 'int', True, None),
    8: ('input_shape', 'BlobShape', True, None),
    100: ('layer', 'LayerParameter', True, None),
  },
  'V1LayerParameter': {},
  'LayerParameter': {
    1: ('name', 'string', False, ''),
    2: ('type', 'string', False, ''),
    3: ('bottom', 'string', True, None),
    4: ('top', 'string', True, None),
    7: ('blobs', 'BlobProto', True, None),
    10: ('phase', PHASES, False, 'TRAIN'),
    104: ('concat_param', 'ConcatParameter', False, None),
    106: ('convolution_param', 'ConvolutionParameter', False, None),
    108: ('dropout_param', 'DropoutParameter', False, None),
    110: ('eltwise_param', 'EltwiseParameter', False, None),
    121: ('pooling_param', 'PoolingParameter', False, None),
    123: ('relu_param', 'ReLUParameter', False, None),
    143: ('interp_param', 'InterpParameter', False, None),
    152: ('bn_param', 'BNParameter', False, None),
  },
  'BlobShape': {1: ('dim', 'int', True, None)},
  'BlobProto': {
    1: ('num', 'int', False, 0),
    2: ('channels', 'int', False, 0),
    3: ('height', 'int', False, 0),
    4: ('width', 'int', False, 0),
    5: ('data', 'float', True, None),
    8: ('double_data', 'double', True, None),
    7: ('shape', 'BlobShape', False, None),
  },
  'ConvolutionParameter': {
    1: ('num_output', 'int', False, 0),
    2: ('bias_term', 'bool', False, True),
    3: ('pad', 'int', True, None),
    4: ('kernel_size', 'int', True, None),
    5: ('group', 'int', False, 1),
    6: ('stride', 'int', True, None),
    9: ('pad_h', 'int', False, 0),
    10: ('pad_w', 'int', False, 0),
    11: ('kernel_h', 'int', False, 0),
    12: ('kernel_w', 'int', False, 0),
    13: ('stride_h', 'int', False, 0),
    14: ('stride_w', 'int', False, 0),
    16: ('axis', 'int', False, 1),
    18: ('dilation', 'int', True, None),
  },
  'PoolingParameter': {
    1: ('pool', POOL_METHODS, False, 'MAX'),
    2: ('kernel_size', 'int', False, 0),
    3: ('stride', 'int', False, 1),
    4: ('pad', 'int', False, 0),
    5: ('kernel_h', 'int', False, 0),
    6: ('kernel_w', 'int', False, 0),
    7: ('stride_h', 'int', False, 0),
    8: ('stride_w', 'int', False, 0),
    9: ('pad_h', 'int', False, 0),
    10: ('pad_w', 'int', False, 0),
    12: ('global_pooling', 'bool', False, False),
  },
  'InterpParameter': {
    1: ('height', 'int', False, 0),
    2: ('width', 'int', False, 0),
    3: ('zoom_factor', 'int', False, 1),
    4: ('shrink_factor', 'int', False, 1),
    5: ('pad_beg', 'int', False, 0),
    6: ('pad_end', 'int', False, 0),
  },
  'ConcatParameter': {1: ('concat_dim', 'int', False, 1), 2: ('axis', 'int', False, 1)},
  'EltwiseParameter': {
    1: ('operation', ELTWISE_OPS, False, 'SUM'),
    2: ('coeff', 'float', True, None),
  },
  'BNParameter': {
    3: ('momentum', 'float', False, 0.9),
    4: ('eps', 'float', False, 1e-5),
    5: ('frozen', 'bool', False, False),
  },
  'DropoutParameter': {1: ('dropout_ratio', 'float', False, 0.5)},
  'ReLUParameter': {1: ('negative_slope', 'float', False, 0.0)},
}
_BY_NAME = {msg: {f[0]: (num, f) for num, f in fields.items()} for msg, fields in SCHEMA.items()}
_PARAM_MESSAGES = {f[0]: f[1] for f in SCHEMA['LayerParameter'].values() if f[0].endswith('_param')}


@dataclasses.dataclass
class Layer:
  """One ``LayerParameter``: ``params`` maps a ``*_param`` name to the fields present in the
  file (repeated fields as lists); ``blobs`` are float32 arrays of their blob shapes."""

  name: str
  type: str
  bottoms: list[str]
  tops: list[str]
  params: dict[str, dict[str, Any]]
  blobs: list[np.ndarray]
  phase: str | None = None

  def has(self, message: str, field: str) -> bool:
    return field in self.params.get(message, {})

  def param(self, message: str, field: str):
    """The field's value, or its default in caffe.proto when the file leaves it out."""
    value = self.params.get(message, {}).get(field)
    if value is not None:
      return value
    _, (_, _, repeated, default) = _BY_NAME[_PARAM_MESSAGES[message]][field]
    return [] if repeated else default


@dataclasses.dataclass
class Net:
  name: str
  inputs: list[str]  # NetParameter.input (net-level inputs, no layer makes them)
  input_shapes: list[tuple]  # from input_dim / input_shape (a deploy prototxt's)
  layers: list[Layer]
  source: str


# ---- the binary wire format -------------------------------------------------------------


class _Truncated(Exception):
  pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= end:
      raise _Truncated(pos)
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError(f'a varint longer than 10 bytes at byte {pos}')


def _signed(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf, start: int, end: int):
  """(field number, wire type, value) of the message in ``buf[start:end]``; for wire type 2
  the value is the (start, end) of its bytes."""
  pos = start
  while pos < end:
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos, end)
    elif wire == 1:
      value, pos = (pos, pos + 8), pos + 8
    elif wire == 2:
      length, pos = _varint(buf, pos, end)
      value, pos = (pos, pos + length), pos + length
    elif wire == 5:
      value, pos = (pos, pos + 4), pos + 4
    else:
      raise ValueError(
        f'protobuf wire type {wire} (field {number}) at byte {pos}, which Caffe files never hold'
      )
    if pos > end or number == 0:
      raise _Truncated(pos)
    yield number, wire, value


def _scalars(buf, kind, wire: int, value) -> list:
  """One field occurrence -> its values (a packed run gives many; floats as one array)."""
  if kind in ('float', 'double'):
    size, single = (4, 5) if kind == 'float' else (8, 1)
    start, end = value
    if wire not in (2, single) or (end - start) % size:
      raise ValueError(f'a {kind} field with wire type {wire} and {end - start} bytes')
    return [np.frombuffer(buf, '<f4' if size == 4 else '<f8', (end - start) // size, start)]
  if kind == 'string':
    if wire != 2:
      raise ValueError(f'a string field with wire type {wire}')
    return [bytes(buf[value[0] : value[1]]).decode('utf-8', 'replace')]
  if wire == 0:
    values = [value]
  elif wire == 2:  # packed varints
    values, pos, end = [], value[0], value[1]
    while pos < end:
      v, pos = _varint(buf, pos, end)
      values.append(v)
  else:
    raise ValueError(f'a varint field with wire type {wire}')
  if kind == 'bool':
    return [bool(v) for v in values]
  if isinstance(kind, tuple):  # an enum
    return [kind[v] if 0 <= v < len(kind) else v for v in values]
  return [_signed(v) for v in values]


def _message(buf, start: int, end: int, name: str) -> dict:
  schema = SCHEMA[name]
  out: dict[str, Any] = {}
  for number, wire, value in _fields(buf, start, end):
    field = schema.get(number)
    if field is None:
      continue
    fname, kind, repeated, _ = field
    if isinstance(kind, str) and kind in SCHEMA:
      if wire != 2:
        raise ValueError(f'field {fname} is a message but has wire type {wire}')
      values = [_message(buf, value[0], value[1], kind)]
    else:
      values = _scalars(buf, kind, wire, value)
      if kind in ('float', 'double') and fname not in ('data', 'double_data'):
        values = [float(v) for v in values[0]]  # a parameter, not a blob's data
    if repeated:
      out.setdefault(fname, []).extend(values)
    elif values:
      out[fname] = values[-1]  # proto2: the last occurrence wins
  return out


def _blob(proto: dict, layer: str, index: int) -> np.ndarray:
  if 'shape' in proto:
    shape = tuple(int(d) for d in proto['shape'].get('dim', []))
  else:  # the legacy 4-D fields
    shape = tuple(int(proto.get(k, 0)) for k in ('num', 'channels', 'height', 'width'))
  parts = proto.get('data') or proto.get('double_data') or []
  data = (
    parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)
  )
  if data.size != int(np.prod(shape)):
    raise PortError(
      f'layer {layer!r}: blob {index} has shape {shape} ({int(np.prod(shape))} '
      f'values) but holds {data.size} values; the file is damaged'
    )
  return data.reshape(shape).astype(np.float32, copy=False)


def _layer(proto: dict) -> Layer:
  name = proto.get('name', '')
  params = {k: v for k, v in proto.items() if k.endswith('_param')}
  blobs = [_blob(b, name, i) for i, b in enumerate(proto.get('blobs', []))]
  return Layer(
    name=name,
    type=proto.get('type', ''),
    bottoms=list(proto.get('bottom', [])),
    tops=list(proto.get('top', [])),
    params=params,
    blobs=blobs,
    phase=proto.get('phase'),
  )


def read_caffemodel(path: str | os.PathLike) -> Net:
  """A binary ``NetParameter`` file -> ``Net``. Raises ``PortError`` naming the file (and the
  layer, when the damage is inside one) if it is not one or is truncated."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      raise PortError(f'{path}: empty file, not a .caffemodel')
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  name, inputs, dims, layers = '', [], [], []
  last = None
  try:
    for number, wire, value in _fields(buf, 0, size):
      if number == 100 and wire == 2:
        try:
          layers.append(_layer(_message(buf, value[0], value[1], 'LayerParameter')))
        except (ValueError, _Truncated) as e:
          raise PortError(
            f'{path}: layer #{len(layers)} (after {last!r}) is damaged '
            f'({_cause(e)}); the file is not a readable .caffemodel'
          ) from None
        last = layers[-1].name
      elif number == 2 and wire == 2:
        raise PortError(
          f'{path}: a pre-2015 Caffe file (V1 "layers"); upgrade it with Caffe\'s '
          'upgrade_net_proto_binary, or use the released .caffemodel as it is'
        )
      elif number == 1 and wire == 2:
        name = bytes(buf[value[0] : value[1]]).decode('utf-8', 'replace')
      elif number == 3 and wire == 2:
        inputs.append(bytes(buf[value[0] : value[1]]).decode('utf-8', 'replace'))
      elif number == 4:
        dims += _scalars(buf, 'int', wire, value)
  except _Truncated as e:
    where = f'the layer after {last!r}' if last else 'its first field'
    raise PortError(
      f'{path}: truncated, or not a Caffe .caffemodel: {where} runs past the end '
      f'of the file (byte {e.args[0]} of {size})'
    ) from None
  except ValueError as e:
    raise PortError(f'{path}: not a Caffe .caffemodel ({_cause(e)})') from None
  if not layers:
    raise PortError(f'{path}: holds no Caffe layers; not a .caffemodel')
  shapes = [tuple(dims[i : i + 4]) for i in range(0, len(dims), 4)]
  return Net(name=name, inputs=inputs, input_shapes=shapes, layers=layers, source=path)


def _cause(e: BaseException) -> str:
  if isinstance(e, _Truncated):
    return f'a field runs past the end at byte {e.args[0]}'
  return str(e)


def looks_like_caffemodel(path: str) -> bool:
  """Whether the file starts like a ``NetParameter`` (its name, inputs or first layer)."""
  with open(path, 'rb') as f:
    head = f.read(2)
  return head[:1] in (b'\x0a', b'\x1a') or head == b'\xa2\x06'


# ---- the text format (.prototxt) ----------------------------------------------------------

_TOKEN = re.compile(
  r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:;,\[\]<>]|[^\s{}:;,\[\]<>"\'#]+'
)


def _tokens(text: str, path: str):
  pos = 0
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if m is None:
      raise PortError(f'{path}: cannot read the text at character {pos}')
    pos = m.end()
    tok = m.group(0)
    if not tok.strip() or tok.startswith('#'):
      continue
    yield tok


def _parse_text(tokens: list[str], pos: int, closing: str | None, path: str):
  """Generic text-format tree: name -> list of values (strings, or sub-trees)."""
  tree: dict[str, list] = {}
  while pos < len(tokens):
    tok = tokens[pos]
    if tok == closing:
      return tree, pos + 1
    if tok in '{}:;,[]<>':
      raise PortError(f'{path}: unexpected {tok!r} in the text format')
    name, pos = tok, pos + 1
    if pos < len(tokens) and tokens[pos] == ':':
      pos += 1
    if pos >= len(tokens):
      raise PortError(f'{path}: the text ends inside field {name!r}')
    if tokens[pos] in ('{', '<'):
      sub, pos = _parse_text(tokens, pos + 1, '}' if tokens[pos] == '{' else '>', path)
      tree.setdefault(name, []).append(sub)
    else:
      tree.setdefault(name, []).append(tokens[pos])
      pos += 1
    if pos < len(tokens) and tokens[pos] in (';', ','):
      pos += 1
  if closing is not None:
    raise PortError(f'{path}: a {{ block is never closed')
  return tree, pos


def _text_value(token: str, kind, path: str, field: str):
  try:
    if kind == 'string':
      if token[:1] in '"\'':
        return bytes(token[1:-1], 'utf-8').decode('unicode_escape')
      return token
    if kind == 'bool':
      if token.lower() in ('true', 't', '1', 'false', 'f', '0'):
        return token.lower() in ('true', 't', '1')
      raise ValueError(token)
    if kind in ('float', 'double'):
      return float(token.rstrip('fF'))
    if isinstance(kind, tuple):
      return kind[int(token)] if token.isdigit() else kind[kind.index(token)]
    return int(token, 0)
  except (ValueError, IndexError):
    raise PortError(
      f'{path}: {field}: {token!r} is not a {kind if isinstance(kind, str) else "value of " + "/".join(kind)}'
    ) from None


def _text_message(tree: dict, name: str, path: str) -> dict:
  out: dict[str, Any] = {}
  for fname, values in tree.items():
    if fname not in _BY_NAME[name]:
      continue  # fillers, lr_mult and every other field PSPNet's port does not read
    _, (_, kind, repeated, _) = _BY_NAME[name][fname]
    if isinstance(kind, str) and kind in SCHEMA:
      parsed = [
        _text_message(v, kind, path) if isinstance(v, dict) else _bad(path, fname) for v in values
      ]
    else:
      parsed = [
        _text_value(v, kind, path, f'{name}.{fname}') if isinstance(v, str) else _bad(path, fname)
        for v in values
      ]
    out[fname] = parsed if repeated else parsed[-1]
  return out


def _bad(path, field):
  raise PortError(
    f'{path}: field {field} has the wrong form (a value where a message is due, or the reverse)'
  )


def read_prototxt(path: str | os.PathLike) -> Net:
  """A text ``NetParameter`` (a deploy ``.prototxt``) -> ``Net`` without blobs."""
  path = os.fspath(path)
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise PortError(f'{path}: cannot read the prototxt ({e})') from None
  tree, _ = _parse_text(list(_tokens(text, path)), 0, None, path)
  if 'layers' in tree:
    raise PortError(
      f'{path}: a pre-2015 Caffe prototxt (V1 "layers"); upgrade it with Caffe\'s '
      'upgrade_net_proto_text'
    )
  net = _text_message(tree, 'NetParameter', path)
  layers = [_layer(p) for p in net.get('layer', [])]
  if not layers:
    raise PortError(f'{path}: holds no layers; not a Caffe prototxt')
  dims = net.get('input_dim', [])
  shapes = [tuple(dims[i : i + 4]) for i in range(0, len(dims), 4)]
  shapes += [tuple(s.get('dim', [])) for s in net.get('input_shape', [])]
  return Net(
    name=net.get('name', ''),
    inputs=net.get('input', []),
    input_shapes=shapes,
    layers=layers,
    source=path,
  )
