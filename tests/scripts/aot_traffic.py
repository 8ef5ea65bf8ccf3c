"""Compiles small programs for one chip of a TPU v5e slice on this host and prints, as
JSON, the traffic audit of each beside XLA's ``bytes accessed`` (tests/test_aot.py).

Each program's HBM traffic is known by hand: see the test."""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from pspnet_jax import aot, hlo, ops
from pspnet_jax.train import cross_entropy, upsampled_cross_entropy


def main():
  device = aot.tpu_devices('v5e', 'v5e:2x2')[0]
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
    shape, dtype, sharding=SingleDeviceSharding(device)
  )
  b, h, c, out = 2, 30, 150, 233
  loss_args = [spec((b, h, h, c)), spec((b, out, out), jnp.int32)]
  programs = {
    'elementwise': (lambda x: x * 2 + 1, [spec((1024, 1024))]),
    'matmul': (
      lambda x, w: x @ w,
      [spec((512, 1024), jnp.bfloat16), spec((1024, 2048), jnp.bfloat16)],
    ),
    'slice': (
      lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False) * 2,
      [spec((64, 1024, 1024)), spec((), jnp.int32)],
    ),
    'padded': (lambda x: x * 2, [spec((1000, 100))]),
    'loop_in_vmem': (
      lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) * 2, x),
      [spec((1024, 1024))],
    ),
    'loss_plain': (
      jax.value_and_grad(lambda z, y: cross_entropy(ops.resize_bilinear(z, (out, out), True), y)),
      loss_args,
    ),
    'loss_fused': (
      jax.value_and_grad(
        lambda z, y: upsampled_cross_entropy(z, y, align_corners=True, block_rows=32)
      ),
      loss_args,
    ),
  }
  result = {}
  for name, (f, args) in programs.items():
    compiled = jax.jit(f).trace(*args).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    traffic = hlo.hbm_traffic(compiled.as_text())
    result[name] = {
      'bytes': traffic['bytes'],
      'bytes_padded': traffic['bytes_padded'],
      'by_kind': {k: v['bytes_padded'] for k, v in traffic['by_kind'].items()},
      'xla_bytes_accessed': float(cost['bytes accessed']),
      'vmem_buffers': compiled.as_text().count('S(1)}'),
      'loops': [(l['trips'], l['known']) for l in traffic['loops']],
    }
  json.dump(result, sys.stdout)


if __name__ == '__main__':
  main()
