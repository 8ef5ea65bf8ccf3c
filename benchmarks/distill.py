"""Distillation's gain and cost on the synthetic dataset: the student of
``configs/synthetic_distill.py`` trained with and without its teacher (make run's model),
for the same steps and seeds.

  python benchmarks/distill.py [--teacher runs/synthetic] [--seeds 0,1,2] [--out /tmp/distill]
      [--data-dir runs/tfds] [extra --config.KEY=VALUE ...]

For each seed, one ``train.py`` run without the teacher, then one with it (interleaved, so
that a machine shared with other work slows both alike). Each run's final validation mIoU
(eval.py's protocol of the config, all validation images) and its training throughput (the
median of the logged img/s, the first log row, which holds the compile, left out) are read
from its workdir. Prints a table, the mean and spread (sample standard deviation, min, max)
of each side, the mean gain, the step time ratio with/without the teacher, and one JSON line.
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
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  rates = [r['img_per_s'] for r in rows if r['kind'] == 'train'][1:]
  return {'miou': miou, 'img_per_s': statistics.median(rates), 'wall_s': time.perf_counter() - t0}


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
  args, extra = parser.parse_known_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {'plain': [], 'distilled': []}
  for seed in seeds:
    for side, teacher in (('plain', ''), ('distilled', os.path.abspath(args.teacher))):
      workdir = os.path.join(args.out, f'{side}_seed{seed}')
      r = run(
        workdir, args, [f'--config.seed={seed}', f'--config.distill.teacher={teacher}', *extra]
      )
      results[side].append(r)
      print(
        f'seed {seed} {side:9s} mIoU {r["miou"]:.4f}  {r["img_per_s"]:.1f} img/s  '
        f'({r["wall_s"]:.0f} s)',
        flush=True,
      )
  summary = {side: spread([r['miou'] for r in rows]) for side, rows in results.items()}
  gains = [d['miou'] - p['miou'] for p, d in zip(results['plain'], results['distilled'])]
  rate = {side: statistics.mean(r['img_per_s'] for r in rows) for side, rows in results.items()}
  summary.update(
    gain=spread(gains),
    step_time_ratio=rate['plain'] / rate['distilled'],
    img_per_s=rate,
    seeds=seeds,
    teacher=os.path.abspath(args.teacher),
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
