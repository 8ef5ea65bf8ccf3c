"""Every convolution of a PSPNet-50 train step (batch 2, crop 473), one at a time: forward,
input gradient and weight gradient, in XLA's plain convolution, in `cpu_conv` under each
weight-gradient strategy, and in PyTorch (oneDNN), same shapes, one invocation.

  python benchmarks/conv_cpu.py [--only cls l4_3x3] [--reps 3]
  python benchmarks/conv_cpu.py --depthwise   # MobileNetV2-d8's depthwise convolutions

This is where `pspnet_jax/ops/cpu_conv.py` gets its CPU rules (which weight gradient, when to split
wide inputs, 1x1 as matmul). Prints one JSON line per layer (milliseconds, min over reps)
and totals weighted by how often each shape occurs in the network.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, (N, H, W, Cin, Cout, k, dilation, stride), occurrences in PSPNet-50 (deep stem)
SHAPES = [
  ('stem1', (2, 473, 473, 3, 64, 3, 1, 2), 1),
  ('stem2', (2, 237, 237, 64, 64, 3, 1, 1), 1),
  ('stem3', (2, 237, 237, 64, 128, 3, 1, 1), 1),
  ('l1_3x3', (2, 119, 119, 64, 64, 3, 1, 1), 3),
  ('l1_1x1_in', (2, 119, 119, 256, 64, 1, 1, 1), 2),
  ('l1_1x1_out', (2, 119, 119, 64, 256, 1, 1, 1), 3),
  ('l2_3x3_s2', (2, 119, 119, 128, 128, 3, 1, 2), 1),
  ('l2_3x3', (2, 60, 60, 128, 128, 3, 1, 1), 3),
  ('l2_1x1_in', (2, 60, 60, 512, 128, 1, 1, 1), 3),
  ('l2_1x1_out', (2, 60, 60, 128, 512, 1, 1, 1), 4),
  ('l3_3x3', (2, 60, 60, 256, 256, 3, 2, 1), 6),
  ('l3_1x1_in', (2, 60, 60, 1024, 256, 1, 1, 1), 5),
  ('l3_1x1_out', (2, 60, 60, 256, 1024, 1, 1, 1), 6),
  ('l4_3x3', (2, 60, 60, 512, 512, 3, 4, 1), 3),
  ('l4_1x1_in', (2, 60, 60, 2048, 512, 1, 1, 1), 2),
  ('l4_1x1_out', (2, 60, 60, 512, 2048, 1, 1, 1), 3),
  ('l4_down', (2, 60, 60, 1024, 2048, 1, 1, 1), 1),
  ('cls', (2, 60, 60, 4096, 512, 3, 1, 1), 1),
  ('aux', (2, 60, 60, 1024, 256, 3, 1, 1), 1),
]

# --depthwise: the 3x3 depthwise convs of PSPNet-MobileNetV2-d8 (mmseg's strides and
# dilations), batch 2 x 473, Cin = Cout = groups.
DEPTHWISE_SHAPES = [
  ('l1_dw', (2, 237, 237, 32, 32, 3, 1, 1), 1),
  ('l2_dw_s2', (2, 237, 237, 96, 96, 3, 1, 2), 1),
  ('l2_dw', (2, 119, 119, 144, 144, 3, 1, 1), 1),
  ('l3_dw_s2', (2, 119, 119, 144, 144, 3, 1, 2), 1),
  ('l3_dw', (2, 60, 60, 192, 192, 3, 1, 1), 2),
  ('l4_dw_first', (2, 60, 60, 192, 192, 3, 2, 1), 1),
  ('l4_dw', (2, 60, 60, 384, 384, 3, 2, 1), 3),
  ('l5_dw_first', (2, 60, 60, 384, 384, 3, 2, 1), 1),
  ('l5_dw', (2, 60, 60, 576, 576, 3, 2, 1), 2),
  ('l6_dw_first', (2, 60, 60, 576, 576, 3, 4, 1), 1),
  ('l6_7_dw', (2, 60, 60, 960, 960, 3, 4, 1), 3),
]


def _shapes(args):
  return DEPTHWISE_SHAPES if args.depthwise else SHAPES


def _time(fn, reps):
  fn()
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return round(best * 1e3, 1)


def run_jax(args):
  sys.path.insert(0, ROOT)
  for name, shape, count in _shapes(args):
    if not args.only or name in args.only:
      print(json.dumps(_jax_row(name, shape, count, args.reps, args.depthwise)), flush=True)


def _jax_row(name, shape, count, reps, depthwise):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from pspnet_jax import ops
  from pspnet_jax.ops import cpu_conv

  n, h, w_, ci, co, k, d, s = shape
  pad = ops.conv_padding(k, d)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w_, ci), np.float32))
  groups = ci if depthwise else 1
  w = jnp.asarray(rng.standard_normal((k, k, ci // groups, co), np.float32) * 0.05)

  def plain(x, w):
    return lax.conv_general_dilated(
      x,
      w,
      (s, s),
      pad,
      rhs_dilation=(d, d),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups,
    )

  def mine(x, w):
    if depthwise:
      return cpu_conv.depthwise_conv(x, w, (s, s), pad, (d, d))
    return cpu_conv.cpu_conv(x, w, (s, s), pad, (d, d))

  def split(x, w):
    return cpu_conv.split_conv(x, w, (s, s), pad, (d, d))

  dy = jnp.asarray(rng.standard_normal(plain(x, w).shape, np.float32))
  row = {'name': name, 'count': count}

  def wgrad_fn(f):
    return jax.jit(lambda x, w, dy: jax.vjp(lambda w_: f(x, w_), w)[1](dy))

  def parts(f, tag):
    fwd = jax.jit(f)
    dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x_: f(x_, w), x)[1](dy))
    wgrad = wgrad_fn(f)
    row[f'{tag}_fwd'] = _time(lambda: jax.block_until_ready(fwd(x, w)), reps)
    row[f'{tag}_dgrad'] = _time(lambda: jax.block_until_ready(dgrad(x, w, dy)), reps)
    row[f'{tag}_wgrad'] = _time(lambda: jax.block_until_ready(wgrad(x, w, dy)), reps)

  parts(plain, 'xla')
  if depthwise:
    parts(mine, 'taps')
    return row
  if k == 1:
    parts(mine, 'matmul')
    return row
  row['auto'] = cpu_conv.wgrad_strategy(x.shape, w.shape, (s, s))
  for strategy in ('taps', 'shifted') if s == 1 else ('taps',):
    os.environ['PSPNET_CONV_WGRAD'] = strategy  # read when the gradient is traced
    wgrad = wgrad_fn(mine)
    row[f'{strategy}_wgrad'] = _time(
      lambda wgrad=wgrad: jax.block_until_ready(wgrad(x, w, dy)), reps
    )
  os.environ.pop('PSPNET_CONV_WGRAD')
  if ci > cpu_conv.CIN_CHUNK:
    parts(split, 'split')
  return row


def run_torch(args):
  import torch

  torch.set_num_threads(os.cpu_count())
  for name, shape, count in _shapes(args):
    if not args.only or name in args.only:
      print(json.dumps(_torch_row(name, shape, count, args.reps, args.depthwise)), flush=True)


def _torch_row(name, shape, count, reps, depthwise):
  import torch
  import torch.nn.functional as F

  n, h, w_, ci, co, k, d, s = shape
  x = torch.randn(n, ci, h, w_, requires_grad=True)
  groups = ci if depthwise else 1
  w = (torch.randn(co, ci // groups, k, k) * 0.05).requires_grad_()

  def conv():
    return F.conv2d(x, w, stride=s, padding=d * (k - 1) // 2, dilation=d, groups=groups)

  def fwd():
    with torch.no_grad():
      conv()

  dy = torch.randn_like(conv())
  f = _time(fwd, reps)
  both = _time(lambda: torch.autograd.grad(conv(), (x, w), dy), reps)
  dx_only = _time(lambda: torch.autograd.grad(conv(), (x,), dy), reps)
  return {
    'name': name,
    'count': count,
    'torch_fwd': f,
    'torch_dgrad': round(dx_only - f, 1),
    'torch_wgrad': round(both - dx_only, 1),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--only', nargs='*', default=None)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--depthwise', action='store_true', help="MobileNetV2-d8's depthwise convs")
  ap.add_argument('--child', default=None)
  args = ap.parse_args()
  if args.child:
    return (run_jax if args.child == 'jax' else run_torch)(args)
  rows = {}
  for fw in ('torch', 'jax'):
    cmd = [sys.executable, __file__, '--child', fw, '--reps', str(args.reps)]
    if args.only:
      cmd += ['--only', *args.only]
    if args.depthwise:
      cmd.append('--depthwise')
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout
    for line in out.splitlines():
      r = json.loads(line)
      rows.setdefault(r['name'], {}).update(r)
  totals = {}
  for r in rows.values():
    print(json.dumps(r))
    for key, v in r.items():
      if isinstance(v, float) and key.split('_')[-1] in ('fwd', 'dgrad', 'wgrad'):
        totals[key] = totals.get(key, 0.0) + r['count'] * max(v, 0.0)
  print('TOTALS_MS ' + json.dumps({k: round(v) for k, v in sorted(totals.items())}))


if __name__ == '__main__':
  main()
