"""Train step of PSPNet-50 (semseg recipe: SGD + coupled wd, aux 0.4, sync-BN semantics):
JAX jit vs PyTorch eager vs torch.compile, same model, same batch, one invocation.

  python benchmarks/train_step.py --batch 2 --size 473 --steps 3 --rounds 2
  python benchmarks/train_step.py --backbone mobilenet_v2 --batch 2 --size 473 --steps 3 --rounds 2
  python benchmarks/train_step.py --frameworks jax,jax-full-res-loss,torch-eager   # the loss

Each framework runs in its own subprocess (clean peak RSS); rounds alternate JAX and
PyTorch so drifting machine load hits both alike. Prints a JSON line per measurement and
a summary with the ratios. On a GPU (--dtype bfloat16) it also reports XLA's FLOP count
and MFU given --peak-tflops.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mmseg's mobilenet-v2-d8 PSPNet (tests/torch_mobilenet_reference.py is its PyTorch twin).
MOBILENET_V2 = dict(backbone='mobilenet_v2', ppm_channels=512, align_corners=False)


def run_jax(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, ROOT)
  from pspnet_jax import checkpoint
  from pspnet_jax import mesh as mesh_lib
  from pspnet_jax.models import PSPNetConfig
  from pspnet_jax.train import OptimizerConfig, make_optimizer, make_train_step

  cfg = PSPNetConfig(
    depth=args.depth,
    num_classes=args.classes,
    dtype=args.dtype,
    **(MOBILENET_V2 if args.backbone == 'mobilenet_v2' else {}),
  )
  model = checkpoint.create_model(cfg)
  graphdef, params, bstats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(OptimizerConfig(), 1000)
  mesh = mesh_lib.data_mesh()
  rep = NamedSharding(mesh, P())
  state = jax.device_put(
    {
      'params': params,
      'batch_stats': bstats,
      'opt_state': tx.init(params),
      'step': jnp.zeros((), jnp.int32),
      'rng': jax.random.key_data(jax.random.key(0)),
    },
    rep,
  )
  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch(
    {
      'image': rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32),
      'label': rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32),
    },
    mesh,
  )
  step = jax.jit(
    make_train_step(
      graphdef, tx, aux_weight=0.4, ignore_label=255, loss_block_rows=args.loss_block_rows
    ),
    in_shardings=(rep, NamedSharding(mesh, P('data'))),
    out_shardings=(rep, rep),
    donate_argnums=(0,),
  )
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis() or {}
  mem = compiled.memory_analysis()
  state, m = compiled(state, batch)
  float(m['loss'])
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    float(m['loss'])
    times.append(time.perf_counter() - t)
  out = {
    'framework': 'jax',
    'loss_block_rows': args.loss_block_rows,
    'conv': os.environ.get('PSPNET_CONV', 'auto'),
    'wgrad': os.environ.get('PSPNET_CONV_WGRAD', 'auto'),
    'device': str(jax.devices()[0]),
    'compile_s': compile_s,
    'step_s': statistics.median(times),
    'all_s': times,
    'flops': cost.get('flops'),
    'xla_temp_bytes': getattr(mem, 'temp_size_in_bytes', None),
  }
  if jax.default_backend() == 'gpu':
    out['peak_bytes'] = jax.devices()[0].memory_stats().get('peak_bytes_in_use')
  return out


def run_torch(args, compile_):
  import numpy as np
  import torch
  import torch.nn.functional as F

  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from torch_mobilenet_reference import TorchMobileNetPSPNet
  from torch_reference import TorchPSPNet

  torch.set_num_threads(os.cpu_count())
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  if args.backbone == 'mobilenet_v2':
    model, heads = TorchMobileNetPSPNet(num_classes=args.classes), ('decode_head', 'auxiliary_head')
  else:
    model, heads = TorchPSPNet(num_classes=args.classes, depth=args.depth), ('ppm', 'cls', 'aux')
  model = model.to(dev).train()
  head = [p for n, p in model.named_parameters() if n.split('.')[0] in heads]
  back = [p for n, p in model.named_parameters() if n.split('.')[0] not in heads]
  opt = torch.optim.SGD(
    [{'params': back}, {'params': head, 'lr': 0.1}], lr=0.01, momentum=0.9, weight_decay=1e-4
  )
  rng = np.random.default_rng(0)
  x = torch.from_numpy(
    rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
  ).to(dev)
  y = torch.from_numpy(rng.integers(0, args.classes, (args.batch, args.size, args.size))).to(dev)
  amp = dev == 'cuda' and args.dtype == 'bfloat16'

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      out, aux = model(x)
      loss = F.cross_entropy(out, y, ignore_index=255) + 0.4 * F.cross_entropy(
        aux, y, ignore_index=255
      )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()

  fn = torch.compile(step) if compile_ else step
  t = time.perf_counter()
  fn()
  first_s = time.perf_counter() - t
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  out = {
    'framework': 'torch.compile' if compile_ else 'torch-eager',
    'device': dev,
    'first_step_s': first_s,
    'step_s': statistics.median(times),
    'all_s': times,
  }
  if dev == 'cuda':
    out['peak_bytes'] = torch.cuda.max_memory_allocated()
  return out


def child(args):
  if args.child == 'jax':
    out = run_jax(args)
  else:
    out = run_torch(args, args.child == 'torch-compile')
  out['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print('RESULT ' + json.dumps(out), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=50)
  ap.add_argument('--backbone', default='resnet', choices=['resnet', 'mobilenet_v2'])
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--size', type=int, default=473)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--dtype', default='float32')
  ap.add_argument(
    '--frameworks',
    default='jax,torch-eager,jax-xla-conv,torch-compile',
    help="jax-xla-conv: XLA's plain convolutions (PSPNET_CONV=xla), i.e. without "
    'the CPU rewrites of ops/cpu_conv.py; jax-xla-wgrad: only its weight gradients; '
    'jax-full-res-loss: the loss on logits resized to full resolution first '
    '(--loss-block-rows=0, the composition) instead of in row blocks',
  )
  ap.add_argument(
    '--loss-block-rows',
    type=int,
    default=32,
    help="the train step's loss_block_rows (config.loss_block_rows)",
  )
  ap.add_argument('--peak-tflops', type=float, default=0.0, help='for MFU on accelerators')
  ap.add_argument('--timeout', type=int, default=1200)
  ap.add_argument('--child', default=None)
  args = ap.parse_args()
  if args.child:
    return child(args)
  results = {}
  for _ in range(args.rounds):
    for fw in args.frameworks.split(','):
      env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
      name = fw
      if fw == 'jax-xla-wgrad':
        env['PSPNET_CONV_WGRAD'], fw = 'xla', 'jax'
      elif fw == 'jax-xla-conv':
        env['PSPNET_CONV'], fw = 'xla', 'jax'
      extra = []
      if fw == 'jax-full-res-loss':
        fw, extra = 'jax', ['--loss-block-rows=0']
      cmd = (
        [sys.executable, __file__, '--child', fw]
        + [
          f'--{k.replace("_", "-")}={v}'
          for k, v in vars(args).items()
          if k
          in ('depth', 'backbone', 'classes', 'batch', 'size', 'steps', 'dtype', 'loss_block_rows')
        ]
        + extra
      )
      try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
      except subprocess.TimeoutExpired:
        print(
          json.dumps({'framework': name, 'error': f'timed out after {args.timeout}s'}), flush=True
        )
        continue
      line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
      if not line:
        print(json.dumps({'framework': name, 'error': p.stderr[-2000:]}), flush=True)
        continue
      r = json.loads(line[0][7:])
      r['framework'] = name
      print(json.dumps(r), flush=True)
      results.setdefault(name, []).append(r)
  summary = {
    k: {
      'step_s': statistics.median(x['step_s'] for x in v),
      'peak_rss_gib': max(x['peak_rss_gib'] for x in v),
    }
    for k, v in results.items()
  }
  if 'torch-eager' in summary:
    for k in summary:
      summary[k]['over_torch_eager'] = summary[k]['step_s'] / summary['torch-eager']['step_s']
  for v in summary.values():
    v['img_per_s'] = args.batch / v['step_s']
  jax_runs = results.get('jax') or []
  if jax_runs and args.peak_tflops and jax_runs[0].get('flops'):
    summary['jax']['mfu'] = (
      jax_runs[0]['flops'] / summary['jax']['step_s'] / (args.peak_tflops * 1e12)
    )
  print('SUMMARY ' + json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
