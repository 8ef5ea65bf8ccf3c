"""Distillation's gain and cost on the synthetic dataset: the student of
``configs/synthetic_distill.py`` trained with and without its teacher (make run's model),
for the same steps and seeds.

  python benchmarks/distill.py [--teacher runs/synthetic] [--seeds 0,1,2] [--out /tmp/distill]
      [--data-dir runs/tfds] [--rounds 20] [extra --config.KEY=VALUE ...]

For each seed, one ``train.py`` run without the teacher, then one with it. Each run's final
validation mIoU (eval.py's protocol of the config, all validation images) is read from its
workdir. Then the step time: both compiled steps (``train.state.create_trainer`` with and
without the teacher, the config's batch on random data) in this one process, called in
interleaved rounds so that a machine shared with other work slows both alike; the median of
each. Prints a table, the mean and spread (sample standard deviation, min, max) of each
side's mIoU, the gain, the step time ratio with/without the teacher, and one JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, args, extra):
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    os.path.join(ROOT, 'configs', 'synthetic_distill.py'),
    '--workdir',
    workdir,
    f'--config.dataset.data_dir={args.data_dir}',
    *extra,
  ]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  if p.returncode != 0:
    sys.exit(f'{" ".join(cmd)} failed:\n{p.stderr[-3000:]}')
  miou = json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))['miou']
  return {'miou': miou, 'wall_s': time.perf_counter() - t0}


def step_times(teacher: str, rounds: int) -> dict:
  """Median seconds of the student's compiled step without and with ``teacher``."""
  import jax
  import numpy as np
  from flax import nnx

  sys.path.insert(0, ROOT)
  from configs.synthetic_distill import get_config
  from pspnet_jax import checkpoint
  from pspnet_jax import mesh as mesh_lib
  from pspnet_jax.train import distill
  from pspnet_jax.train.init_checkpoint import model_config_from
  from pspnet_jax.train.state import create_trainer

  config = get_config()
  model_config = model_config_from(config, checkpoint.model_config(teacher).num_classes)
  mesh = mesh_lib.data_mesh()
  b, c = config.global_batch_size, config.augment.crop_size
  rng = np.random.default_rng(0)
  batch = mesh_lib.global_batch(
    {
      'image': rng.standard_normal((b, c, c, 3)).astype(np.float32),
      'label': rng.integers(0, model_config.num_classes, (b, c, c)).astype(np.int32),
    },
    mesh,
  )
  runs = {}
  for side, path in (('plain', ''), ('distilled', teacher)):
    config.distill.teacher = path
    graphdef, params, stats = nnx.split(
      checkpoint.create_model(model_config), nnx.Param, nnx.BatchStat
    )
    trainer = create_trainer(
      config,
      graphdef,
      total_steps=10_000,
      ignore_label=255,
      mesh=mesh,
      distill=distill.from_config(config, model_config),
    )
    state = jax.device_put(trainer.initial_state(params, stats, 0), trainer.replicated)
    state, metrics = trainer.step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    runs[side] = [trainer, state, []]
  for _ in range(rounds):
    for run_ in runs.values():
      t0 = time.perf_counter()
      run_[1], metrics = run_[0].step(run_[1], batch)
      jax.block_until_ready(metrics)
      run_[2].append(time.perf_counter() - t0)
  return {side: statistics.median(r[2]) for side, r in runs.items()}


def spread(values):
  return {
    'mean': statistics.mean(values),
    'std': statistics.stdev(values) if len(values) > 1 else 0.0,
    'min': min(values),
    'max': max(values),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--teacher', default=os.path.join(ROOT, 'runs', 'synthetic'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--out', default='/tmp/distill')
  parser.add_argument('--data-dir', default=os.path.join(ROOT, 'runs', 'tfds'))
  parser.add_argument('--rounds', type=int, default=20, help='timed steps of each side')
  parser.add_argument('--timing-only', action='store_true', help='only the step time ratio')
  args, extra = parser.parse_known_args()
  teacher = os.path.abspath(args.teacher)
  times = step_times(teacher, args.rounds)
  ratio = times['distilled'] / times['plain']
  print(
    f'step time: {times["plain"] * 1e3:.0f} ms without the teacher, '
    f'{times["distilled"] * 1e3:.0f} ms with it ({ratio:.2f}x; median of {args.rounds})',
    flush=True,
  )
  if args.timing_only:
    print(json.dumps({'step_s': times, 'step_time_ratio': ratio, 'teacher': teacher}))
    return
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {'plain': [], 'distilled': []}
  for seed in seeds:
    for side, teacher in (('plain', ''), ('distilled', os.path.abspath(args.teacher))):
      workdir = os.path.join(args.out, f'{side}_seed{seed}')
      r = run(
        workdir, args, [f'--config.seed={seed}', f'--config.distill.teacher={teacher}', *extra]
      )
      results[side].append(r)
      print(f'seed {seed} {side:9s} mIoU {r["miou"]:.4f}  ({r["wall_s"]:.0f} s)', flush=True)
  summary = {side: spread([r['miou'] for r in rows]) for side, rows in results.items()}
  gains = [d['miou'] - p['miou'] for p, d in zip(results['plain'], results['distilled'])]
  summary.update(
    gain=spread(gains), step_s=times, step_time_ratio=ratio, seeds=seeds, teacher=teacher
  )
  for side in ('plain', 'distilled'):
    s = summary[side]
    print(
      f'{side:9s} mIoU mean {s["mean"]:.4f}  std {s["std"]:.4f}  '
      f'[{s["min"]:.4f}, {s["max"]:.4f}] over seeds {seeds}'
    )
  g = summary['gain']
  print(f'gain {g["mean"]:+.4f} (std {g["std"]:.4f}, min {g["min"]:+.4f}, max {g["max"]:+.4f})')
  print(f'step time with / without the teacher: {summary["step_time_ratio"]:.2f}x')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
