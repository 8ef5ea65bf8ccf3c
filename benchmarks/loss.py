"""The training loss with its gradient: at the logits' resolution in row blocks
(``upsampled_cross_entropy``, the train step's) against the full-resolution composition
(resize the logits to the label's size, then cross entropy: ``block_rows=0``), one process,
alternating rounds, on whatever device JAX has.

  python benchmarks/loss.py --batch 2 --size 473 --classes 150 --rounds 5
  python benchmarks/loss.py --batch 8 --size 473 --classes 150 --block-rows 64,32,16   # a GPU

Prints a JSON line per path (median seconds of ``--steps`` calls per round, the compiled
program's temporary memory) and the ratios to the composition.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--size', type=int, default=473)
  p.add_argument('--classes', type=int, default=150)
  p.add_argument('--output-stride', type=int, default=8)
  p.add_argument('--block-rows', default='32', help='comma-separated; 0 is the composition')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rounds', type=int, default=5)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, ROOT)
  from pspnet_jax.train.loss import upsampled_cross_entropy

  low = (args.size - 1) // args.output_stride + 1  # the dilated network's feature size
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((args.batch, low, low, args.classes)), jnp.float32)
  labels = rng.integers(0, args.classes, (args.batch, args.size, args.size))
  labels[rng.random(labels.shape) < 0.1] = 255
  labels = jnp.asarray(labels, jnp.int32)
  paths = sorted({0, *(int(r) for r in args.block_rows.split(','))})
  programs = {}
  for rows in paths:
    f = jax.jit(
      jax.value_and_grad(
        lambda z, y, rows=rows: upsampled_cross_entropy(z, y, align_corners=True, block_rows=rows)
      )
    )
    compiled = f.lower(z, labels).compile()
    jax.block_until_ready(compiled(z, labels))
    programs[rows] = compiled
  times = {rows: [] for rows in paths}
  for _ in range(args.rounds):
    for rows, compiled in programs.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        out = compiled(z, labels)
      jax.block_until_ready(out)
      times[rows].append((time.perf_counter() - t) / args.steps)
  base = statistics.median(times[0])
  device = jax.devices()[0]
  for rows in paths:
    mem = programs[rows].memory_analysis()
    print(
      json.dumps(
        {
          'path': 'composition' if rows == 0 else f'blocks of {rows} rows',
          'block_rows': rows,
          'device': device.device_kind,
          'batch': args.batch,
          'size': args.size,
          'classes': args.classes,
          'median_s': statistics.median(times[rows]),
          'min_s': min(times[rows]),
          'ratio_to_composition': statistics.median(times[rows]) / base,
          'temp_mib': mem.temp_size_in_bytes / 2**20 if mem else None,
        }
      )
    )


if __name__ == '__main__':
  main()
