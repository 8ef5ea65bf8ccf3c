"""PSPNet forward: jit compile time and forward time in JAX next to PyTorch eager, same
weights, same input, one process (so the two share the machine's state).

  python benchmarks/forward.py --depth 50 --size 473 --batch 1 --repeats 5
  python benchmarks/forward.py --backbone mobilenet_v2 --size 473 --batch 1 --repeats 5

Prints one JSON line. Needs torch (the test extra). Times are wall-clock medians; on a
shared 2-core CPU only the ratio is meaningful.
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
import torch
from flax import nnx

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), '..')
)  # run from a checkout, installed or not
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from torch_mobilenet_reference import TorchMobileNetPSPNet  # noqa: E402
from torch_reference import TorchPSPNet, randomize, state_dict_numpy  # noqa: E402

from pspnet_jax.models import PSPNet, PSPNetConfig  # noqa: E402
from pspnet_jax.port import LAYOUTS, load_state_dict  # noqa: E402


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=50)
  ap.add_argument('--backbone', default='resnet', choices=['resnet', 'mobilenet_v2'])
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--size', type=int, default=473)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--repeats', type=int, default=5)
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())

  if args.backbone == 'mobilenet_v2':  # mmseg's mobilenet-v2-d8 PSPNet, in mmseg's key names
    cfg = PSPNetConfig(
      backbone='mobilenet_v2', num_classes=args.classes, ppm_channels=512, align_corners=False
    )
    ref = randomize(TorchMobileNetPSPNet(num_classes=args.classes))
    state = LAYOUTS['mmseg-mobilenet_v2'].to_canonical(
      state_dict_numpy(ref), backbone_only=False, source='reference'
    )[0]
    name = 'PSPNet-MobileNetV2'
  else:
    cfg = PSPNetConfig(depth=args.depth, num_classes=args.classes)
    ref = randomize(TorchPSPNet(num_classes=args.classes, depth=args.depth))
    state, name = state_dict_numpy(ref), f'PSPNet-{args.depth}'
  model = PSPNet(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, state)
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = (
    np.random.default_rng(0)
    .standard_normal((args.batch, args.size, args.size, 3))
    .astype(np.float32)
  )
  xj = jnp.asarray(x)
  t = time.perf_counter()
  compiled = forward.lower(state, xj).compile()
  compile_s = time.perf_counter() - t
  flops = (
    compiled.cost_analysis().get('flops', float('nan'))
    if compiled.cost_analysis()
    else float('nan')
  )
  out = compiled(state, xj).block_until_ready()  # warm-up
  jax_s, jax_all = timed(lambda: compiled(state, xj).block_until_ready(), args.repeats)

  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    ref_out = ref(xt)  # warm-up
    torch_s, torch_all = timed(lambda: ref(xt), args.repeats)
  ref_np = ref_out.numpy().transpose(0, 2, 3, 1)
  rel = float(np.abs(np.asarray(out) - ref_np).max() / np.abs(ref_np).max())
  print(
    json.dumps(
      {
        'model': name,
        'input': [args.batch, args.size, args.size, 3],
        'jax': jax.__version__,
        'torch': torch.__version__,
        'device': str(jax.devices()[0]),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'jax_compile_s': round(compile_s, 2),
        'jax_forward_s': round(jax_s, 3),
        'torch_forward_s': round(torch_s, 3),
        'jax_over_torch': round(jax_s / torch_s, 3),
        'xla_gflop': round(flops / 1e9, 1),
        'max_rel_diff': rel,
        'jax_all_s': [round(v, 3) for v in jax_all],
        'torch_all_s': [round(v, 3) for v in torch_all],
      }
    )
  )


if __name__ == '__main__':
  main()
