"""The int8 ONNX artifact against the float one, on a trained model and its validation split.

  python benchmarks/quantize.py [--model-dir runs/synthetic] [--data-dir runs/tfds]
      [--dataset synthetic_shapes] [--crop-size 96] [--calibration-images 100] [--repeats 20]

Exports ``model.onnx`` and ``model.int8.onnx`` with ``pspnet_jax.export.export_model``
(calibration: ``dataset:NAME:train``), then, in this one process: file sizes; the argmax
agreement of int8 with float over every validation pixel and over the labelled ones; the
mIoU of each on the validation split (one forward of each image at its own size, no flip:
the artifact as deployed, not eval.py's protocol); and the CPU latency of one
``crop x crop`` image, the two sessions called in interleaved rounds so that a machine
shared with other work slows both alike. Prints the CPU's int8 dot-product extensions
(VNNI, AMX) from ``/proc/cpuinfo``: without them onnxruntime's int8 convolutions are not
expected to be faster than float. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from export import interleaved_medians  # noqa: E402  (benchmarks/export.py)

from pspnet_jax import data, export  # noqa: E402
from pspnet_jax.evaluation import metrics  # noqa: E402

INT8_FLAGS = ('avx512_vnni', 'avx_vnni', 'avx_vnni_int8', 'amx_int8')


def cpu_int8_flags() -> dict:
  """The CPU's model name and which int8 dot-product extensions its flags list."""
  try:
    text = open('/proc/cpuinfo').read()
  except OSError:
    return {'model': None, 'int8_extensions': None}
  flags = set()
  model = None
  for line in text.splitlines():
    key, _, value = line.partition(':')
    if key.strip() == 'flags':
      flags |= set(value.split())
    elif key.strip() == 'model name' and model is None:
      model = value.strip()
  return {'model': model, 'int8_extensions': [f for f in INT8_FLAGS if f in flags]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model-dir', default='runs/synthetic')
  ap.add_argument('--data-dir', default='runs/tfds')
  ap.add_argument('--dataset', default='synthetic_shapes')
  ap.add_argument('--val-split', default='val')
  ap.add_argument('--crop-size', type=int, default=96)
  ap.add_argument('--calibration-images', type=int, default=100)
  ap.add_argument('--repeats', type=int, default=20)
  ap.add_argument('--out', help='export folder (default: a temporary one)')
  args = ap.parse_args()
  out = args.out or os.path.join(tempfile.mkdtemp(prefix='quantize-bench-'), 'artifact')
  manifest = export.export_model(
    args.model_dir,
    out,
    formats=('onnx', 'onnx-int8'),
    calibration=f'dataset:{args.dataset}:train',
    calibration_images=args.calibration_images,
    crop_size=args.crop_size,
    data_dir=args.data_dir,
  )
  arts = manifest['artifacts']
  sessions = {
    fmt: onnxruntime.InferenceSession(
      os.path.join(out, arts[fmt]['file']), providers=['CPUExecutionProvider']
    )
    for fmt in ('onnx', 'onnx-int8')
  }
  num_classes = manifest['model']['num_classes']
  confusion = {fmt: np.zeros((num_classes, num_classes), np.int64) for fmt in sessions}
  same = pixels = same_labelled = labelled = 0
  val = data.eval_source(args.dataset, args.val_split, args.data_dir)
  for i in range(len(val)):
    ex = val[i]
    x = ex['image'][None].astype(np.float32)
    pred = {fmt: s.run(None, {'image': x})[0].argmax(-1)[0] for fmt, s in sessions.items()}
    mask = ex['label'] != 255
    agree = pred['onnx'] == pred['onnx-int8']
    same, pixels = same + int(agree.sum()), pixels + agree.size
    same_labelled, labelled = same_labelled + int(agree[mask].sum()), labelled + int(mask.sum())
    truth = ex['label'][mask].astype(np.int64)
    for fmt, p in pred.items():
      confusion[fmt] += np.bincount(
        truth * num_classes + p[mask], minlength=num_classes**2
      ).reshape(num_classes, num_classes)
  x = np.random.default_rng(0).uniform(0, 255, (1, args.crop_size, args.crop_size, 3))
  x = x.astype(np.float32)
  latency = interleaved_medians(
    {fmt: (lambda s=s: s.run(None, {'image': x})) for fmt, s in sessions.items()}, args.repeats
  )
  miou = {fmt: round(metrics.segmentation_metrics(c)['miou'], 4) for fmt, c in confusion.items()}
  print(
    json.dumps(
      {
        'model_dir': args.model_dir,
        'bytes': {fmt: arts[fmt]['bytes'] for fmt in sessions},
        'size_ratio': round(arts['onnx-int8']['bytes'] / arts['onnx']['bytes'], 3),
        'validation_images': len(val),
        'agreement_all_pixels': round(same / pixels, 5),
        'agreement_labelled_pixels': round(same_labelled / labelled, 5),
        'agreement_calibration_images': round(
          arts['onnx-int8']['agreement_with_float']['agreement'], 5
        ),
        'miou': miou,
        'latency_s': latency,
        'latency_ratio_int8_over_float': round(latency['onnx-int8'] / latency['onnx'], 3),
        'latency_input': [1, args.crop_size, args.crop_size, 3],
        'float_nodes': len(arts['onnx-int8']['quantization']['float_nodes']),
        'cpu': cpu_int8_flags(),
        'cores': os.cpu_count(),
        'onnxruntime': onnxruntime.__version__,
      }
    )
  )


if __name__ == '__main__':
  main()
