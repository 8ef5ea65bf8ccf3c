"""Structured pruning of make run's model (configs/synthetic.py, ResNet-18 at width 16): for
each ratio, the pruned model's parameters, XLA FLOPs and CPU forward time next to the
original's, its validation mIoU right after pruning and after fine-tuning with train.py.

  python benchmarks/prune.py [--model runs/synthetic] [--data-dir runs/tfds] \\
      [--ratios 0.3,0.5] [--criterion l1] [--steps 200] [--lr 0.01] [--out /tmp/prune]

Per ratio: ``python -m pspnet_jax.prune MODEL --out OUT/r<R> --ratio R`` (default layers:
blocks' inner convs, cls.0, aux.0); ``eval.py --checkpoint OUT/r<R>`` (no fine-tuning);
``train.py --config.init_checkpoint=OUT/r<R> --config.num_steps=STEPS
--config.optimizer.learning_rate=LR`` (configs/synthetic.py's recipe otherwise: batch 16,
crop 96, poly schedule), whose final evaluation is the fine-tuned mIoU. The original is
evaluated by the same eval.py command. All evaluations: the config's protocol (whole image,
96 px), all 64 validation images.

FLOPs: ``jax.jit(forward).lower(x).compile().cost_analysis()['flops']`` for one 96x96 image,
traced with XLA's convolution (``conv.backend=xla``): XLA counts a convolution as 2 flops per
multiply-add, and one flop per element of the BN, ReLU, resize and pooling arithmetic. Time:
the forward as predict runs it on this CPU (default conv backend), the original and each
pruned model called in turn in one process, median of the rounds. Prints a table and one
JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout, installed or not
from pspnet_jax import checkpoint, prune  # noqa: E402
from pspnet_jax.ops import backend  # noqa: E402

SIZE = 96  # configs/synthetic.py's crop


def command(args, *cmd):
  t = time.perf_counter()
  p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
  if p.returncode != 0:
    sys.exit(f'{" ".join(cmd)} failed:\n{p.stderr[-3000:]}')
  return time.perf_counter() - t


def evaluate(args, model_dir, out):
  command(
    args,
    'eval.py',
    '--config',
    'configs/synthetic.py',
    '--checkpoint',
    model_dir,
    '--out',
    out,
    f'--config.dataset.data_dir={args.data_dir}',
  )
  return json.load(open(os.path.join(out, 'metrics.json')))['miou']


def forward_program(model, conv_backend):
  backend.configure(conv_backend)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  x = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  compiled = fn.lower(state, x).compile()
  backend.configure()
  return compiled, state, x


def measure(models, rounds):
  """{name: (flops, median forward seconds)}, the forwards timed in turn, round by round."""
  flops = {
    name: forward_program(m, 'xla')[0].cost_analysis()['flops'] for name, m in models.items()
  }
  programs = {name: forward_program(m, 'auto') for name, m in models.items()}
  times = {name: [] for name in models}
  for _ in range(rounds + 1):  # the first round warms up
    for name, (compiled, state, x) in programs.items():
      t = time.perf_counter()
      compiled(state, x).block_until_ready()
      times[name].append(time.perf_counter() - t)
  return {name: (flops[name], statistics.median(times[name][1:])) for name in models}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--model', default=os.path.join(ROOT, 'runs', 'synthetic'))
  ap.add_argument('--data-dir', default=os.path.join(ROOT, 'runs', 'tfds'))
  ap.add_argument('--ratios', default='0.3,0.5')
  ap.add_argument('--criterion', default='l1', choices=prune.CRITERIA)
  ap.add_argument('--steps', type=int, default=200)
  ap.add_argument('--lr', type=float, default=0.01)
  ap.add_argument('--rounds', type=int, default=20)
  ap.add_argument('--out', default='/tmp/prune')
  args = ap.parse_args()
  model_dir, data_dir = os.path.abspath(args.model), os.path.abspath(args.data_dir)
  args.data_dir = data_dir
  ratios = [float(r) for r in args.ratios.split(',')]
  rows = {'original': {'ratio': 0.0, 'miou_pruned': None}}
  rows['original']['miou_tuned'] = evaluate(args, model_dir, os.path.join(args.out, 'eval_orig'))
  models = {'original': checkpoint.load_model(model_dir)}
  for r in ratios:
    name, pruned_dir = f'r{r}', os.path.join(args.out, f'r{r}')
    command(args, '-m', 'pspnet_jax.prune', model_dir, '--out', pruned_dir, '--ratio', str(r),
            '--criterion', args.criterion)  # fmt: skip
    row = {'ratio': r}
    row['miou_pruned'] = evaluate(args, pruned_dir, os.path.join(args.out, f'eval_{name}'))
    workdir = os.path.join(args.out, f'tuned_{name}')
    row['fine_tune_s'] = command(
      args,
      'train.py',
      '--config',
      'configs/synthetic.py',
      '--workdir',
      workdir,
      f'--config.init_checkpoint={pruned_dir}',
      f'--config.dataset.data_dir={data_dir}',
      f'--config.num_steps={args.steps}',
      f'--config.optimizer.learning_rate={args.lr}',
      f'--config.checkpoint_every_steps={args.steps}',
      '--config.eval_every_steps=0',
    )
    row['miou_tuned'] = json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))['miou']
    rows[name] = row
    models[name] = checkpoint.load_model(pruned_dir)
    print(f'{name}: {row}', flush=True)
  for name, (flops, seconds) in measure(models, args.rounds).items():
    rows[name].update(
      params=prune.parameter_count(models[name]), flops=flops, forward_ms=seconds * 1e3
    )
  base = rows['original']
  print(
    f'\n{"model":9s} {"params":>9s} {"GFLOP":>7s} {"flops":>6s} {"time":>6s} '
    f'{"mIoU pruned":>11s} {"mIoU tuned":>10s}'
  )
  for name, row in rows.items():
    pruned = '-' if row['miou_pruned'] is None else f'{row["miou_pruned"]:.4f}'
    print(
      f'{name:9s} {row["params"]:9,d} {row["flops"] / 1e9:7.3f} '
      f'{row["flops"] / base["flops"]:6.2f} {row["forward_ms"] / base["forward_ms"]:6.2f} '
      f'{pruned:>11s} {row["miou_tuned"]:10.4f}'
    )
  summary = {
    'model': model_dir,
    'criterion': args.criterion,
    'steps': args.steps,
    'lr': args.lr,
    'input': [1, SIZE, SIZE, 3],
    'cpu_count': os.cpu_count(),
    'load_average': os.getloadavg()[0],
    'rows': rows,
  }
  print(json.dumps(summary, default=lambda v: float(np.asarray(v))))


if __name__ == '__main__':
  main()
