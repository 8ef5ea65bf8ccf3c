"""Ahead-of-time compilation for TPU without a TPU: the real train step, or the evaluator's
per-bucket program, compiled on this (CPU) host for a TPU topology, with what the compiler
says of it per device: memory, FLOPs, bytes, every collective, compile time, and a roofline
bound on the step time.

  python -m pspnet_jax.aot --config configs/ade20k_pspnet50.py --target tpu:v5e:2x2 \\
      --program train --json aot.json --config.model.dtype=bfloat16 [--config.KEY=VALUE ...]

Needs libtpu, which brings the TPU compiler (``pip install -e .[aot]``); nothing is run and
no TPU is needed. ``--target tpu:GENERATION:TOPOLOGY`` (e.g. ``v5e:2x2``, ``v5p:2x2x1``,
``v6e:2x2``, ``v4:2x2x1``) names the slice; the train step's global batch is
``config.global_batch_size``, sharded over all its chips. The programs hold XLA's own
convolutions: the CPU kernels (``ops.cpu_conv``) are chosen by the platform a program is
lowered for, here TPU.

The roofline bound is ``max(FLOPs / peak, bytes accessed / HBM bandwidth, collective bytes
on the wire / ICI bandwidth)`` per chip, hence an upper bound on images/s and MFU. It
ignores: imperfect overlap of the three, kernel launch and pipeline bubbles, the host
input pipeline, data in VMEM, layout padding inside fusions, and that XLA's cost model
counts the body of a loop (gradient accumulation's ``scan``, the evaluator's window loop)
once (scaled here by the known trip counts, an approximation). XLA's own
``optimal_seconds`` estimate is not used: it came out negative for these programs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pspnet_jax import checkpoint, errors
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.data import BUILDERS
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator
from pspnet_jax.train import OptimizerConfig, make_optimizer, make_train_step, schedules
from pspnet_jax.train.init_checkpoint import model_config_from

# Per chip, from Google Cloud's TPU system-architecture pages (v4, v5e, v5p, v6e), except
# v4's ICI figure, which those pages do not give (6 links of ~90 GB/s, approximate).
CHIPS = {
    'v4': dict(peak_bf16_flops=275e12, hbm_bytes=32 * 2**30, hbm_bytes_per_s=1200e9,
               ici_bytes_per_s=540e9),
    'v5e': dict(peak_bf16_flops=197e12, hbm_bytes=16 * 2**30, hbm_bytes_per_s=819e9,
                ici_bytes_per_s=400e9),
    'v5p': dict(peak_bf16_flops=459e12, hbm_bytes=95 * 2**30, hbm_bytes_per_s=2765e9,
                ici_bytes_per_s=1200e9),
    'v6e': dict(peak_bf16_flops=918e12, hbm_bytes=32 * 10**9, hbm_bytes_per_s=1638e9,
                ici_bytes_per_s=800e9),
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


class AotError(UserError):
  """A target or option this tool cannot compile for; the message says what to do."""


def parse_target(target: str) -> tuple[str, str]:
  """'tpu:v5e:2x2' -> ('v5e', 'v5e:2x2')."""
  parts = target.split(':')
  if len(parts) != 3 or parts[0] != 'tpu' or parts[1] not in CHIPS:
    raise AotError(f'--target {target!r}: expected tpu:GENERATION:TOPOLOGY with GENERATION one '
                   f'of {sorted(CHIPS)}, e.g. tpu:v5e:2x2')
  return parts[1], f'{parts[1]}:{parts[2]}'


def tpu_devices(generation: str, topology: str) -> list:
  """Compile-only devices of a TPU slice, one per chip."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise AotError('libtpu is not installed: pip install -e ".[aot]" (it brings the TPU '
                   'compiler; no TPU is needed)') from None
  from jax.experimental import topologies
  kwargs = {'chip_config_name': 'megacore'} if generation == 'v4' else {}  # one device a chip
  # Compiling opens no chip, so a second libtpu process (another AOT run) is no conflict;
  # without this libtpu refuses to load while another process holds its lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  return list(topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs).devices)


# ---- what the compiler says -------------------------------------------------------------

_SHAPE = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


def _split_shape(text: str) -> tuple[str, str]:
  """'<shape> <opcode>(...)' -> (shape, rest); shapes may be nested tuples with layouts."""
  depth = 0
  for i, ch in enumerate(text):
    depth += ch in '({[' and 1 or (ch in ')}]' and -1 or 0)
    if ch == ' ' and depth == 0:
      return text[:i], text[i + 1:]
  return text, ''


def _arrays(shape: str) -> list[tuple[str, int]]:
  """(dtype, element count) of every array in an HLO shape, layouts ignored."""
  out = []
  for dtype, dims in _SHAPE.findall(re.sub(r'\{[^{}]*\}', '', shape)):
    if dtype in DTYPE_BYTES:
      out.append((dtype, int(np.prod([int(d) for d in dims.split(',') if d] or [1]))))
  return out


def _group_size(attrs: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=\[\d+,(\d+)\]<=', attrs)  # iota form [groups, size]<=[n]
  if m:
    return int(m.group(1))
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', attrs)  # explicit {{0,1,...},...}
  if m:
    return len(m.group(1).split(','))
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """Every collective of an optimised HLO module once: ``op``, ``dtype``, ``elements`` and
  ``bytes`` of its operands per device, ``group`` (participants) and ``in_loop`` (its
  computation is a while body, run once per iteration). Asynchronous pairs count at their
  ``-start``; a combined (tuple) collective is one entry per dtype."""
  shapes: dict[str, str] = {}
  loop_bodies = set(re.findall(r'\bwhile\(.*?body=%?([\w.\-]+)', hlo_text))
  out, computation = [], ''
  for line in hlo_text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      m = _COMPUTATION.match(line)
      computation = m.group(1) if m else ''
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, body = m.groups()
    shape, rest = _split_shape(body)
    shapes[name] = shape
    op = rest.split('(', 1)[0]
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base not in COLLECTIVES:
      continue
    args = rest[len(op) + 1:]
    operands = re.findall(r'%([\w.\-]+)', args.split(')', 1)[0])
    arrays = [a for o in operands if o in shapes for a in _arrays(shapes[o])]
    if not arrays:
      arrays = _arrays(shape)[:1] if op != base else _arrays(shape)
    by_dtype: dict[str, int] = {}
    for dtype, n in arrays:
      by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    for dtype, n in sorted(by_dtype.items()):
      out.append({'op': base, 'dtype': dtype, 'elements': n, 'bytes': n * DTYPE_BYTES[dtype],
                  'group': _group_size(args, num_devices), 'in_loop': computation in loop_bodies})
  return out


def _wire_bytes(c: dict) -> float:
  """Bytes one device sends for a collective, ring algorithms."""
  g = max(c['group'], 1)
  factor = {'all-reduce': 2 * (g - 1) / g, 'all-gather': g - 1, 'reduce-scatter': (g - 1) / g,
            'all-to-all': (g - 1) / g, 'collective-permute': 1.0}[c['op']]
  return c['bytes'] * factor


def analyse(compiled, *, generation: str, num_devices: int, loop_trips: int = 1) -> dict:
  """Per-device figures of a compiled program and its roofline bound (seconds)."""
  chip = CHIPS[generation]
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2**30
  arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  aliased, temporaries = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  total = arguments + outputs - aliased + temporaries + mem.generated_code_size_in_bytes
  peak = max(getattr(mem, 'peak_memory_in_bytes', 0) or 0, total)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) * loop_trips
  bytes_accessed = float(cost.get('bytes accessed', 0.0)) * loop_trips
  colls = collectives(compiled.as_text(), num_devices)
  wire = sum(_wire_bytes(c) * (loop_trips if c['in_loop'] else 1) for c in colls)
  summary: dict[str, dict] = {}
  for c in colls:
    s = summary.setdefault(f'{c["op"]}:{c["dtype"]}', {'count': 0, 'elements': 0})
    s['count'] += 1
    s['elements'] += c['elements']
  bound = {'compute': flops / chip['peak_bf16_flops'],
           'memory': bytes_accessed / chip['hbm_bytes_per_s'],
           'interconnect': wire / chip['ici_bytes_per_s']}
  seconds = max(bound.values())
  return {
      'memory_gib': {'arguments': gib(arguments), 'outputs': gib(outputs), 'aliased': gib(aliased),
                     'temporaries': gib(temporaries), 'total': gib(total), 'peak': gib(peak),
                     'hbm': gib(chip['hbm_bytes']), 'fits': peak <= chip['hbm_bytes']},
      'flops': flops, 'bytes_accessed': bytes_accessed,
      'collectives': colls, 'collective_summary': summary, 'collective_wire_bytes': wire,
      'roofline_seconds': {**bound, 'bound': seconds,
                           'limited_by': max(bound, key=bound.get)},
      'mfu_upper_bound': bound['compute'] / seconds if seconds > 0 else None,
  }


# ---- the programs -----------------------------------------------------------------------

def _num_classes(config, override: int) -> int:
  if override:
    return override
  builder = BUILDERS.get(config.dataset.name)
  names = getattr(builder, 'CLASS_NAMES', ()) if builder else ()
  if not names:
    raise AotError(f'the number of classes of dataset {config.dataset.name!r} is known only '
                   'once it is prepared: pass --num_classes N')
  return len(names)


def compile_train(config, devices, num_classes: int):
  """The train step of ``train.py`` for ``config`` on ``devices``: (compiled, info)."""
  batch = int(config.global_batch_size)
  accum = int(config.get('grad_accum_steps', 1))
  mesh_lib.check_batch_size(batch, accum, devices)
  mesh = mesh_lib.mesh_over(devices)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  model_config = model_config_from(config, num_classes)
  graphdef, params, batch_stats = nnx.split(checkpoint.abstract_model(model_config),
                                            nnx.Param, nnx.BatchStat)
  total_steps = max(int(config.get('num_steps') or 0), 1000)  # the schedule's length only
  opt_config = OptimizerConfig(**dict(config.optimizer))
  tx = make_optimizer(opt_config, total_steps)
  state = {'params': params, 'batch_stats': batch_stats, 'opt_state': jax.eval_shape(tx.init, params),
           'step': jax.ShapeDtypeStruct((), jnp.int32),
           'rng': jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  crop = int(config.augment.crop_size)
  data = {'image': jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32, sharding=sharded),
          'label': jax.ShapeDtypeStruct((batch, crop, crop), jnp.int32, sharding=sharded)}
  step = make_train_step(graphdef, tx, aux_weight=config.aux_weight, ignore_label=255,
                         grad_accum_steps=accum, lr_schedules=schedules(opt_config, total_steps))
  jitted = jax.jit(step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = jitted.trace(state, data).lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  times = {'trace_and_lower_s': t1 - t0, 'compile_s': time.perf_counter() - t1}
  return compiled, {'images_per_step': batch, 'loop_trips': accum, 'timings': times,
                    'model': model_config.to_dict(), 'crop_size': crop,
                    'convolutions_in_program': lowered.as_text().count('stablehlo.convolution')}


def compile_eval(config, devices, num_classes: int, image_size: tuple[int, int]):
  """The evaluator's program for one ``image_size`` image with ``config.eval``."""
  model_config = model_config_from(config, num_classes)
  eval_config = EvalConfig.from_config(config.eval, 255)
  evaluator = Evaluator(checkpoint.abstract_model(model_config), eval_config,
                        mesh_lib.mesh_over(devices))
  t0 = time.perf_counter()
  lowered, batches = evaluator.lower(*image_size)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  times = {'trace_and_lower_s': t1 - t0, 'compile_s': time.perf_counter() - t1}
  return compiled, {'images_per_step': 1, 'loop_trips': max(sum(batches), 1), 'timings': times,
                    'model': model_config.to_dict(), 'eval': dataclasses.asdict(eval_config),
                    'image_size': list(image_size), 'window_batches_per_scale': batches,
                    'window_batch': evaluator.window_batch,
                    'convolutions_in_program': lowered.as_text().count('stablehlo.convolution')}


def run(config, target: str, program: str, *, num_classes: int = 0,
        image_size: tuple[int, int] = (512, 683)) -> dict:
  """Compiles ``program`` ('train' | 'eval') of ``config`` for ``target``; the JSON dict."""
  generation, topology = parse_target(target)
  if program not in ('train', 'eval'):
    raise AotError(f"--program must be 'train' or 'eval', got {program!r}")
  classes = _num_classes(config, num_classes)
  t0 = time.perf_counter()
  devices = tpu_devices(generation, topology)
  load_s = time.perf_counter() - t0
  if program == 'train':
    compiled, info = compile_train(config, devices, classes)
  else:
    compiled, info = compile_eval(config, devices, classes, image_size)
  # XLA counts a loop's body once: the accumulation scan (train) or the window loop (eval)
  # holds the network, so its trip count scales the program's cost (exact for one loop,
  # approximate for several scales, whose loops differ).
  figures = analyse(compiled, generation=generation, num_devices=len(devices),
                    loop_trips=info['loop_trips'])
  step_s = figures['roofline_seconds']['bound']
  chip = CHIPS[generation]
  return {
      'target': target, 'program': program, 'chips': len(devices),
      'device_kind': devices[0].device_kind, 'topology_load_s': load_s,
      'jax': jax.__version__, 'dataset': config.dataset.name, 'num_classes': classes,
      **info, 'per_chip': figures, 'chip': chip,
      'images_per_second_upper_bound': info['images_per_step'] / step_s if step_s > 0 else None,
  }


@errors.command
def main(argv):
  from absl import flags
  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments {argv[1:]}')
  h, _, w = flags_.image_size.partition('x')
  if not (h.isdigit() and (w or h).isdigit()):
    raise AotError(f'--image_size {flags_.image_size!r}: expected HxW, e.g. 512x683')
  result = run(flags_.config, flags_.target, flags_.program, num_classes=flags_.num_classes,
               image_size=(int(h), int(w or h)))
  text = json.dumps(result, indent=1, default=float)
  if flags_.json:
    with open(flags_.json, 'w') as f:
      f.write(text + '\n')
  m = result['per_chip']
  print(text if not flags_.json else
        f'{result["program"]} on {result["target"]}: {m["memory_gib"]["peak"]:.2f} GiB a chip '
        f'(fits {m["memory_gib"]["fits"]}), {m["flops"]:.3g} FLOP, bound '
        f'{m["roofline_seconds"]["bound"] * 1e3:.1f} ms ({m["roofline_seconds"]["limited_by"]}), '
        f'compile {result["timings"]["compile_s"]:.0f} s -> {flags_.json}')


if __name__ == '__main__':
  from absl import app, flags, logging
  from ml_collections import config_flags
  errors.check_config_overrides(sys.argv, 'configs/synthetic.py')
  config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Training configuration file.')
  flags.DEFINE_string('target', 'tpu:v5e:2x2', 'tpu:GENERATION:TOPOLOGY, e.g. tpu:v5e:2x2.')
  flags.DEFINE_enum('program', 'train', ['train', 'eval'], 'The train step or the evaluator.')
  flags.DEFINE_string('json', None, 'Write the figures to this file (else print them).')
  flags.DEFINE_integer('num_classes', 0, 'Classes, when the dataset does not fix them.')
  flags.DEFINE_string('image_size', '512x683', 'HxW of the image the eval program is built for.')
  logging.set_verbosity(logging.WARNING)
  app.run(main)
