"""int8 post-training quantisation of the ONNX artifact, by onnxruntime's own static
quantisation (``onnxruntime.quantization``): its pre-processing (``quant_pre_process``),
then ``quantize_static`` in the QDQ format with int8 weights (per output channel by
default) and uint8 activations, calibrated (min/max) on images read through the
prediction preprocessing.

  python -m pspnet_jax.export MODEL_DIR --out DIR --format onnx-int8 --calibration SRC \\
      [--calibration-images N] [--crop-size N] [--data-dir DIR] [--per-channel|--per-tensor]

``SRC`` is a folder of images or ``dataset:NAME[:SPLIT]``, a prepared dataset (split
``train`` unless named) in ``--data-dir``. ``N`` images (default 100), spread evenly over
the source, are read as predict reads them (RGB; 16-bit scaled to 8), resized bilinearly
to ``crop x crop`` with OpenCV's sampling, as the evaluation protocol resizes
(``evaluation/protocol.py``, step 1), and fed at 0-255: the normalisation is in the graph.

What is quantised, and what stays float:
- only the convolutions (``Conv``): they hold nearly all the weights and the arithmetic.
  The graph also computes its resize taps and pooling bins from the input's size (float
  arithmetic on coordinates: ``Mul``, ``Floor``, ``Clip``...); quantised, those
  coordinates would be clipped to the range seen at the calibration size and rounded to
  256 levels, which moves every tap;
- the classifier convolution and everything after it (the final resize, a softmax or
  argmax) stay float (``nodes_to_exclude``): they cost little and decide the class.

onnxruntime's symbolic shape inference (part of ``quant_pre_process``) cannot follow the
graph's computed sizes ("Incomplete symbolic shape inference"), so it is skipped; ONNX's
own shape inference and onnxruntime's graph optimisation (BN folding into the
convolutions) still run.
"""

from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (
  CalibrationDataReader,
  CalibrationMethod,
  QuantFormat,
  QuantType,
  quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.predict import list_images, read_rgb
from pspnet_jax.ops import interpolation_matrix

CALIBRATION_IMAGES = 100
DATASET_PREFIX = 'dataset:'
DEFAULT_SPLIT = 'train'
OP_TYPES = ('Conv',)


class QuantizeError(UserError):
  """A calibration source or setting that cannot be used; says what to change."""


def resize_to_crop(image: np.ndarray, crop: int) -> np.ndarray:
  """uint8 ``[H, W, 3]`` -> float32 ``[crop, crop, 3]`` on the 0-255 scale: bilinear with
  OpenCV's ``INTER_LINEAR`` sampling (half-pixel centres, no antialiasing), the
  evaluation protocol's resize."""
  h, w = image.shape[:2]
  rows = interpolation_matrix(h, crop, False, 'opencv')
  cols = interpolation_matrix(w, crop, False, 'opencv')
  return np.einsum('ih,hwc,jw->ijc', rows, image.astype(np.float32), cols).astype(np.float32)


def _spread(total: int, count: int) -> list[int]:
  """``count`` indices spread evenly over ``range(total)`` (all of them if fewer)."""
  if count >= total:
    return list(range(total))
  return sorted({int(i) for i in np.linspace(0, total - 1, count).round()})


def parse_source(source: str) -> tuple[str, str | None]:
  """``(folder, None)`` or ``(dataset name, split)`` from ``--calibration``'s value."""
  if not source.startswith(DATASET_PREFIX):
    return source, None
  name, _, split = source[len(DATASET_PREFIX) :].partition(':')
  if not name:
    raise QuantizeError(
      f'--calibration {source}: give a dataset name, dataset:NAME[:SPLIT] (e.g. '
      'dataset:ade20k:train), or a folder of images'
    )
  return name, split or DEFAULT_SPLIT


def calibration_images(
  source: str, count: int = CALIBRATION_IMAGES, crop: int = 473, data_dir: str | None = None
) -> tuple[list[np.ndarray], dict]:
  """``count`` images of ``source`` (a folder, or ``dataset:NAME[:SPLIT]`` prepared in
  ``data_dir``), each float32 ``[crop, crop, 3]`` RGB 0-255, and a description of what was
  read. Any unreadable image, an empty folder or an unknown dataset is a ``QuantizeError``
  naming it."""
  name, split = parse_source(source)
  if split is None:
    try:
      files = list_images(name)
    except UserError as e:
      raise QuantizeError(f'--calibration {e} (give a folder of images)') from None
    chosen = [files[i] for i in _spread(len(files), count)]
    images = []
    for path in chosen:
      try:
        images.append(read_rgb(path))
      except UserError as e:
        raise QuantizeError(
          f'--calibration {e} (remove or replace it; nothing was written)'
        ) from None
    described = {'source': os.path.abspath(name), 'kind': 'folder', 'files': len(files)}
  else:
    if data_dir is None:
      raise QuantizeError(
        f'--calibration {source} needs --data-dir DIR, the folder where prepared datasets '
        'live (python -m pspnet_jax.data.prepare NAME --data-dir DIR)'
      )
    from pspnet_jax import data

    try:
      records = data.eval_source(name, split, data_dir)
    except UserError as e:
      raise QuantizeError(f'--calibration {source}: {e}') from None
    if len(records) == 0:
      raise QuantizeError(f'--calibration {source}: the split has no images (choose another)')
    images = [records[i]['image'] for i in _spread(len(records), count)]
    described = {
      'source': source,
      'kind': 'dataset',
      'data_dir': os.path.abspath(data_dir),
      'split_size': len(records),
    }
  described.update(count=len(images), crop_size=crop, resize='bilinear, OpenCV sampling')
  return [resize_to_crop(np.asarray(im), crop) for im in images], described


def float_nodes(graph) -> list[str]:
  """Names of the nodes kept in float: the last ``Conv`` on the way to the first output
  (the classifier) and every node downstream of it (final resize, softmax, argmax)."""
  producers = {o: n for n in graph.node for o in n.output}
  consumers = collections.defaultdict(list)
  for n in graph.node:
    for i in n.input:
      consumers[i].append(n)
  # Walk up from the output, breadth first, to the nearest convolution.
  frontier, seen, classifier = [graph.output[0].name], set(), None
  while frontier and classifier is None:
    nxt = []
    for tensor in frontier:
      node = producers.get(tensor)
      if node is None or node.name in seen:
        continue
      seen.add(node.name)
      if node.op_type == 'Conv':
        classifier = node
        break
      nxt.extend(node.input)
    frontier = nxt
  if classifier is None:
    raise ValueError('the graph has no convolution before its output')
  kept, stack = [], [classifier]
  while stack:
    node = stack.pop()
    if node.name in kept:
      continue
    kept.append(node.name)
    for o in node.output:
      stack.extend(consumers[o])
  order = {n.name: i for i, n in enumerate(graph.node)}
  return sorted(kept, key=order.get)


class ImageReader(CalibrationDataReader):
  """onnxruntime's calibration feed: ``{input_name: [1, H, W, 3]}`` per image."""

  def __init__(self, images: list[np.ndarray], input_name: str):
    self.images, self.feeds = images, iter([{input_name: x[None]} for x in images])

  def get_next(self) -> dict | None:
    return next(self.feeds, None)

  def __len__(self) -> int:
    return len(self.images)


def quantize_onnx(
  float_path: str, out_path: str, images: list[np.ndarray], *, per_channel: bool = True
) -> dict:
  """Writes the int8 model of the ONNX file ``float_path`` to ``out_path``, calibrated on
  ``images`` (float32 ``[H, W, 3]``); returns the settings and the nodes kept in float."""
  with tempfile.TemporaryDirectory(prefix='.quantize-', dir=os.path.dirname(out_path)) as tmp:
    prepared = os.path.join(tmp, 'prepared.onnx')
    quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
    model = onnx.load(prepared)
    kept = float_nodes(model.graph)
    input_name = model.graph.input[0].name
    quantize_static(
      prepared,
      out_path,
      ImageReader(images, input_name),
      quant_format=QuantFormat.QDQ,
      op_types_to_quantize=list(OP_TYPES),
      per_channel=per_channel,
      activation_type=QuantType.QUInt8,
      weight_type=QuantType.QInt8,
      nodes_to_exclude=kept,
      calibrate_method=CalibrationMethod.MinMax,
    )
  quantized = onnx.load(out_path).graph
  op_counts = collections.Counter(n.op_type for n in quantized.node)
  by_name = {n.name: n.op_type for n in model.graph.node}
  return {
    'method': 'onnxruntime.quantization.quantize_static',
    'format': 'QDQ',
    'weights': 'int8 per channel' if per_channel else 'int8 per tensor',
    'activations': 'uint8',
    'calibration_method': 'MinMax',
    'op_types_quantized': list(OP_TYPES),
    'convolutions': op_counts['Conv'],
    'quantize_linear_nodes': op_counts['QuantizeLinear'],
    'float_nodes': [{'name': n, 'op_type': by_name[n]} for n in kept],
    'pre_process': 'quant_pre_process(skip_symbolic_shape=True)',
  }


def argmax_agreement(float_path: str, int8_path: str, images: list[np.ndarray]) -> dict:
  """The share of pixels whose class (argmax of the last axis, or the output itself when it
  is already classes) is the same for both ONNX files, over ``images``."""
  sessions = [
    onnxruntime.InferenceSession(p, providers=['CPUExecutionProvider'])
    for p in (float_path, int8_path)
  ]
  name = sessions[0].get_inputs()[0].name
  same = total = 0
  for x in images:
    a, b = (classes_of(s.run(None, {name: x[None]})[0]) for s in sessions)
    same += int((a == b).sum())
    total += a.size
  return {'pixels': total, 'images': len(images), 'agreement': same / total}


def classes_of(output: np.ndarray) -> np.ndarray:
  """Class ids ``[B, H, W]`` of an artifact's output: logits or probabilities
  ``[B, H, W, C]`` (argmax), or the classes themselves."""
  return output if output.ndim == 3 else output.argmax(-1)
