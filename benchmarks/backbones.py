"""PSPNet's backbones side by side: XLA's FLOP count and CPU forward time of PSPNet with
ShuffleNetV2, MobileNetV2 and ResNet-50 at one input size, in one process, the three timed
in interleaved rounds so they share the machine's state.

  python benchmarks/backbones.py --size 512 --batch 1 --rounds 5
  python benchmarks/backbones.py --models shufflenet_v2_x1.0,mobilenet_v2 --prune-ratio 0.5

``--prune-ratio R`` adds each model pruned by ``pspnet_jax.prune`` (``--layers all``, l1; for
the light backbones that is their heads and pyramid) beside it, timed in the same rounds.

MobileNetV2 and ShuffleNetV2 carry the heads of their configs (mmseg's PSPHead: 512-channel
pyramid branches, align_corners=False); ResNet-50 semseg's. Random weights (the time and
the FLOPs do not depend on them), 150 classes, eval mode (no aux head). ``flops`` is
``compiled.cost_analysis()['flops']``: XLA's HloCostAnalysis of the compiled CPU program,
2 per multiply-add of a convolution or matmul plus 1 per element of an elementwise op,
reduction and resize (so it counts more than the usual multiply-add figure x 2 of the
convolutions alone). Prints one JSON line; on a shared CPU only the ratios are meaningful.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))  # run from a checkout

from pspnet_jax import prune  # noqa: E402
from pspnet_jax.models import PSPNet, PSPNetConfig  # noqa: E402

MMSEG_HEAD = dict(ppm_channels=512, align_corners=False)
MODELS = {
  'shufflenet_v2_x1.0': dict(backbone='shufflenet_v2', width_mult=1.0, **MMSEG_HEAD),
  'mobilenet_v2': dict(backbone='mobilenet_v2', **MMSEG_HEAD),
  'resnet50': dict(depth=50),
}


def compiled_forward(model: PSPNet, x):
  graphdef, state = nnx.split(model)
  params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  t = time.perf_counter()
  compiled = forward.lower(state, x).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (lambda: compiled(state, x).block_until_ready()), {
    'params_m': round(params / 1e6, 2),
    'xla_gflop': round(cost['flops'] / 1e9, 1),
    'compile_s': round(compile_s, 1),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--models', default=','.join(MODELS), help=f'comma-separated, of {list(MODELS)}')
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--size', type=int, default=512)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--prune-ratio', type=float, default=0.0)
  args = ap.parse_args()
  models = {}
  for name in args.models.split(','):
    models[name] = PSPNet(PSPNetConfig(num_classes=args.classes, **MODELS[name]), rngs=nnx.Rngs(0))
    models[name].eval()
    if args.prune_ratio:
      pruned, _ = prune.prune_model(models[name], args.prune_ratio, layers='all')
      models[f'{name} pruned {args.prune_ratio}'] = pruned
  names = list(models)
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), np.float32)
  )
  runs, result = {}, {}
  for name in names:
    runs[name], result[name] = compiled_forward(models[name], x)
    runs[name]()  # warm-up
  times = {name: [] for name in names}
  for _ in range(args.rounds):  # interleaved: a slow patch of the machine hits every model
    for name in names:
      t = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - t)
  for name in names:
    result[name]['forward_s'] = round(statistics.median(times[name]), 3)
    result[name]['all_s'] = [round(v, 3) for v in times[name]]
  ratio = lambda a, b: {
    'flops': round(result[a]['xla_gflop'] / result[b]['xla_gflop'], 3),
    'time': round(result[a]['forward_s'] / result[b]['forward_s'], 3),
  }
  if args.prune_ratio:  # each pruned model against its original
    ratios = {f'{a}/{b}': ratio(a, b) for a, b in zip(names[1::2], names[::2])}
  else:  # each model against the last
    ratios = {f'{name}/{names[-1]}': ratio(name, names[-1]) for name in names[:-1]}
  print(
    json.dumps(
      {
        'input': [args.batch, args.size, args.size, 3],
        'classes': args.classes,
        'jax': jax.__version__,
        'device': str(jax.devices()[0]),
        'cpus': os.cpu_count(),
        'models': result,
        'ratios': ratios,
      }
    )
  )


if __name__ == '__main__':
  main()
