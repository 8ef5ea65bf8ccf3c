"""CPU latency of the deployment artifacts next to PyTorch eager, same weights, same image.

  python benchmarks/export.py --depth 50 --size 473 --repeats 5 [--formats stablehlo,onnx]

Builds a PSPNet (random weights with calibrated BN statistics, from the PyTorch reference),
writes it as a model directory, exports it with ``pspnet_jax.export.export_model``, then in
this one process times one image through: the StableHLO artifact (deserialised and called,
as a serving process without flax would), onnxruntime on the ONNX file, PyTorch eager, and
pspnet_jax's own jit-compiled forward at the static shape (the cost of symbolic shapes).
The rounds interleave the runners, so a machine shared with other work slows all alike.
Prints one JSON line: export time and size per artifact, median latencies, their ratios to
PyTorch, and each artifact's largest difference from PyTorch's logits relative to
max|logit|. On a shared CPU only the ratios are meaningful.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from torch_reference import TorchPSPNet, randomize, state_dict_numpy  # noqa: E402

from pspnet_jax import checkpoint, export  # noqa: E402
from pspnet_jax.models import PSPNet, PSPNetConfig  # noqa: E402
from pspnet_jax.normalize import normalize  # noqa: E402
from pspnet_jax.port import load_state_dict  # noqa: E402


def interleaved_medians(runners: dict, repeats: int) -> dict:
  """name -> median seconds of ``runners[name]()``, one call of each per round."""
  for fn in runners.values():
    fn()  # warm-up (compilation, allocations)
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, fn in runners.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: round(statistics.median(ts), 3) for name, ts in times.items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=50)
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--size', type=int, default=473)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--formats', default='stablehlo,onnx')
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())
  formats = tuple(args.formats.split(','))

  ref = randomize(TorchPSPNet(num_classes=args.classes, depth=args.depth))
  ref.eval()
  model = PSPNet(PSPNetConfig(depth=args.depth, num_classes=args.classes), rngs=nnx.Rngs(0))
  load_state_dict(model, state_dict_numpy(ref))
  image = np.random.default_rng(0).uniform(0, 255, (1, args.size, args.size, 3)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(np.ascontiguousarray(normalize(image).transpose(0, 3, 1, 2)))
    want = ref(xt).numpy().transpose(0, 2, 3, 1)
  scale = float(np.abs(want).max())
  result = {
    'model': f'PSPNet-{args.depth}',
    'input': list(image.shape),
    'jax': jax.__version__,
    'torch': torch.__version__,
  }

  runners = {}
  static = jax.jit(export.serving_function(model))
  runners['jax_jit_s'] = lambda: static(image).block_until_ready()
  runners['torch_eager_s'] = lambda: ref(xt)  # called under no_grad below
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = checkpoint.save_model(os.path.join(tmp, 'model'), model)
    out = os.path.join(tmp, 'export')
    manifest = export.export_model(model_dir, out, formats=formats, platforms=['cpu'])
    for fmt, art in manifest['artifacts'].items():
      result[f'{fmt}_export_s'] = art['seconds']
      result[f'{fmt}_mib'] = round(art['bytes'] / 2**20, 1)
    if 'stablehlo' in formats:
      with open(os.path.join(out, export.STABLEHLO_FILE), 'rb') as f:
        program = jax.export.deserialize(bytearray(f.read()))
      call = jax.jit(program.call)
      result['stablehlo_rel_diff'] = float(np.abs(np.asarray(call(image)) - want).max() / scale)
      runners['stablehlo_s'] = lambda: call(image).block_until_ready()
    if 'onnx' in formats:
      import onnxruntime

      session = onnxruntime.InferenceSession(
        os.path.join(out, export.ONNX_FILE), providers=['CPUExecutionProvider']
      )
      result['onnxruntime'] = onnxruntime.__version__
      result['onnx_rel_diff'] = float(
        np.abs(session.run(None, {'image': image})[0] - want).max() / scale
      )
      runners['onnxruntime_s'] = lambda: session.run(None, {'image': image})
    with torch.no_grad():
      result.update(interleaved_medians(runners, args.repeats))
  for key in ('stablehlo_s', 'onnxruntime_s', 'jax_jit_s'):
    if key in result:
      result[key.replace('_s', '_over_torch')] = round(result[key] / result['torch_eager_s'], 3)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
