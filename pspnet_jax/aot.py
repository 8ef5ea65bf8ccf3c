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

The roofline bound is ``max(FLOPs / peak, HBM traffic / HBM bandwidth, collective bytes on
the wire / ICI bandwidth)`` per chip, hence an upper bound on images/s and MFU. The traffic
is the program's own, instruction by instruction (``pspnet_jax.hlo.hbm_traffic``; ``--breakdown
N`` prints it by kind, by source line and its top N), not XLA's ``bytes accessed``, which
counts on-chip buffers and whole arrays where slices are read (kept as
``xla_bytes_accessed``). ``--sweep KEY=V1,V2,...`` compiles once per value of a config key.
The bound ignores: imperfect overlap of the three, kernel launch and pipeline bubbles, the
host input pipeline, traffic inside a fusion, and that XLA's cost model counts the FLOPs of
a loop body (gradient accumulation's ``scan``, the evaluator's window loop) once (scaled
here by the known trip counts, an approximation). XLA's own ``optimal_seconds`` estimate is
not used: it came out negative for these programs. See docs/accelerators.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time

import jax
from flax import nnx

from pspnet_jax import _compat, checkpoint, config_file, errors, hlo, ops
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.data import BUILDERS
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator
from pspnet_jax.train import distill
from pspnet_jax.train.init_checkpoint import model_config_from
from pspnet_jax.train.state import create_trainer

# Per chip, from Google Cloud's TPU system-architecture pages (v4, v5e, v5p, v6e), except
# v4's ICI figure, which those pages do not give (6 links of ~90 GB/s, approximate).
CHIPS = {
  'v4': dict(
    peak_bf16_flops=275e12, hbm_bytes=32 * 2**30, hbm_bytes_per_s=1200e9, ici_bytes_per_s=540e9
  ),
  'v5e': dict(
    peak_bf16_flops=197e12, hbm_bytes=16 * 2**30, hbm_bytes_per_s=819e9, ici_bytes_per_s=400e9
  ),
  'v5p': dict(
    peak_bf16_flops=459e12, hbm_bytes=95 * 2**30, hbm_bytes_per_s=2765e9, ici_bytes_per_s=1200e9
  ),
  'v6e': dict(
    peak_bf16_flops=918e12, hbm_bytes=32 * 10**9, hbm_bytes_per_s=1638e9, ici_bytes_per_s=800e9
  ),
}


class AotError(UserError):
  """A target or option this tool cannot compile for; the message says what to do."""


def parse_target(target: str) -> tuple[str, str]:
  """'tpu:v5e:2x2' -> ('v5e', 'v5e:2x2')."""
  parts = target.split(':')
  if len(parts) != 3 or parts[0] != 'tpu' or parts[1] not in CHIPS:
    raise AotError(
      f'--target {target!r}: expected tpu:GENERATION:TOPOLOGY with GENERATION one '
      f'of {sorted(CHIPS)}, e.g. tpu:v5e:2x2'
    )
  return parts[1], f'{parts[1]}:{parts[2]}'


def tpu_devices(generation: str, topology: str) -> list:
  """Compile-only devices of a TPU slice, one per chip."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise AotError(
      'libtpu is not installed: pip install -e ".[aot]" (it brings the TPU '
      'compiler; no TPU is needed)'
    ) from None
  from jax.experimental import topologies

  kwargs = {'chip_config_name': 'megacore'} if generation == 'v4' else {}  # one device a chip
  _compat.allow_multiple_libtpu_load()
  return list(
    topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs).devices
  )


# ---- what the compiler says -------------------------------------------------------------


def _wire_bytes(c: dict) -> float:
  """Bytes one device sends for a collective, ring algorithms."""
  g = max(c['group'], 1)
  factor = {
    'all-reduce': 2 * (g - 1) / g,
    'all-gather': g - 1,
    'reduce-scatter': (g - 1) / g,
    'all-to-all': (g - 1) / g,
    'collective-permute': 1.0,
  }[c['op']]
  return c['bytes'] * factor


def analyse(
  compiled, *, generation: str, num_devices: int, loop_trips: int = 1, breakdown: int = 10
) -> dict:
  """Per-device figures of a compiled program and its roofline bound (seconds).

  The memory term is the audited HBM traffic (``hlo.hbm_traffic``, tile-padded): what the
  program's instructions read from and write to HBM, loops counted per trip (a loop whose
  trip count depends on data, the evaluator's window loop, ``loop_trips`` times). XLA's own
  ``bytes accessed`` stays beside it as ``xla_bytes_accessed``: it counts VMEM-resident
  buffers, whole arrays where slices are read and both halves of async copies, and loop
  bodies once. FLOPs are XLA's, its loop bodies scaled by ``loop_trips`` (gradient
  accumulation's scan or the window loop hold the network).
  """
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
  text = compiled.as_text()
  traffic = hlo.hbm_traffic(text, unknown_trips=loop_trips, top=breakdown)
  colls = hlo.collectives(text, num_devices)
  wire = sum(_wire_bytes(c) * (loop_trips if c['in_loop'] else 1) for c in colls)
  summary: dict[str, dict] = {}
  for c in colls:
    s = summary.setdefault(f'{c["op"]}:{c["dtype"]}', {'count': 0, 'elements': 0})
    s['count'] += 1
    s['elements'] += c['elements']
  bound = {
    'compute': flops / chip['peak_bf16_flops'],
    'memory': traffic['bytes_padded'] / chip['hbm_bytes_per_s'],
    'interconnect': wire / chip['ici_bytes_per_s'],
  }
  seconds = max(bound.values())
  return {
    'memory_gib': {
      'arguments': gib(arguments),
      'outputs': gib(outputs),
      'aliased': gib(aliased),
      'temporaries': gib(temporaries),
      'total': gib(total),
      'peak': gib(peak),
      'hbm': gib(chip['hbm_bytes']),
      'fits': peak <= chip['hbm_bytes'],
    },
    'flops': flops,
    'hbm_traffic': traffic,
    'xla_bytes_accessed': float(cost.get('bytes accessed', 0.0)) * loop_trips,
    'collectives': colls,
    'collective_summary': summary,
    'collective_wire_bytes': wire,
    'collective_bytes': sum(c['bytes'] * (loop_trips if c['in_loop'] else 1) for c in colls),
    'roofline_seconds': {**bound, 'bound': seconds, 'limited_by': max(bound, key=bound.get)},
    'mfu_upper_bound': bound['compute'] / seconds if seconds > 0 else None,
  }


# ---- the programs -----------------------------------------------------------------------


def _num_classes(config, override: int) -> int:
  if override:
    return override
  builder = BUILDERS.get(config.dataset.name)
  names = getattr(builder, 'CLASS_NAMES', ()) if builder else ()
  if not names:
    raise AotError(
      f'the number of classes of dataset {config.dataset.name!r} is known only '
      'once it is prepared: pass --num_classes N'
    )
  return len(names)


def lower_train(config, devices, num_classes: int):
  """The train step of ``train.py`` for ``config`` on ``devices``, lowered: built by
  ``train.state.create_trainer`` as the training loop builds it. ``(lowered, info)``."""
  conv = ops.configure_conv(**dict(config.conv))
  batch = int(config.global_batch_size)
  accum = int(config.grad_accum_steps)
  mesh_lib.check_batch_size(batch, accum, devices)
  model_config = model_config_from(config, num_classes)
  graphdef, params, batch_stats = nnx.split(
    checkpoint.abstract_model(model_config), nnx.Param, nnx.BatchStat
  )
  # The schedule's length changes constants only; without num_steps (epochs of a dataset
  # this host may not have) 1000 stands in.
  trainer = create_trainer(
    config,
    graphdef,
    total_steps=int(config.num_steps) or 1000,
    ignore_label=int(config.augment.ignore_label),
    mesh=mesh_lib.mesh_over(devices),
    distill=distill.from_config(config, model_config, abstract=True),
  )
  crop = int(config.augment.crop_size)
  t0 = time.perf_counter()
  lowered = trainer.step.trace(
    trainer.abstract_state(params, batch_stats), trainer.abstract_batch(batch, crop)
  ).lower()
  return lowered, {
    'images_per_step': batch,
    'loop_trips': accum,
    'model': model_config.to_dict(),
    'crop_size': crop,
    'timings': {'trace_and_lower_s': time.perf_counter() - t0},
    'convolutions_in_program': lowered.as_text().count('stablehlo.convolution'),
    'conv': conv,
  }


def compile_train(config, devices, num_classes: int):
  """The train step of ``train.py`` for ``config`` on ``devices``: (compiled, info)."""
  lowered, info = lower_train(config, devices, num_classes)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  info['timings']['compile_s'] = time.perf_counter() - t0
  return compiled, info


def compile_eval(config, devices, num_classes: int, image_size: tuple[int, int]):
  """The evaluator's program for ``image_size`` images with ``config.eval``, as
  ``eval.py`` runs it on a slice: one image a chip (``Evaluator.evaluate_dataset``)."""
  conv = ops.configure_conv(**dict(config.conv))
  model_config = model_config_from(config, num_classes)
  eval_config = EvalConfig.from_config(config.eval, 255)
  evaluator = Evaluator(
    checkpoint.abstract_model(model_config), eval_config, mesh_lib.mesh_over(devices)
  )
  t0 = time.perf_counter()
  lowered, batches = evaluator.lower(*image_size, one_image_per_device=len(devices) > 1)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  times = {'trace_and_lower_s': t1 - t0, 'compile_s': time.perf_counter() - t1}
  return compiled, {
    'images_per_step': len(devices),
    'loop_trips': max(sum(batches), 1),
    'timings': times,
    'model': model_config.to_dict(),
    'eval': dataclasses.asdict(eval_config),
    'image_size': list(image_size),
    'window_batches_per_scale': batches,
    'windows_per_call_per_chip': evaluator.window_batch // len(devices),
    'convolutions_in_program': lowered.as_text().count('stablehlo.convolution'),
    'conv': conv,
  }


def run(
  config,
  target: str,
  program: str,
  *,
  num_classes: int = 0,
  image_size: tuple[int, int] = (512, 683),
  breakdown: int = 10,
) -> dict:
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
  # holds the network, so its trip count scales the program's FLOPs (exact for one loop,
  # approximate for several scales, whose loops differ); the traffic audit reads static
  # trip counts from the program and uses this one only for data-dependent loops.
  figures = analyse(
    compiled,
    generation=generation,
    num_devices=len(devices),
    loop_trips=info['loop_trips'],
    breakdown=breakdown,
  )
  step_s = figures['roofline_seconds']['bound']
  chip = CHIPS[generation]
  return {
    'target': target,
    'program': program,
    'chips': len(devices),
    'device_kind': devices[0].device_kind,
    'topology_load_s': load_s,
    'jax': jax.__version__,
    'dataset': config.dataset.name,
    'num_classes': classes,
    **info,
    'per_chip': figures,
    'chip': chip,
    'images_per_second_upper_bound': info['images_per_step'] / step_s if step_s > 0 else None,
  }


def parse_sweep(config, spec: str) -> tuple[str, list]:
  """'global_batch_size=8,16,32' -> ('global_batch_size', [8, 16, 32]), each value of the
  key's own type; the key must exist in ``config``."""
  key, sep, values = spec.partition('=')
  if not sep or not values:
    raise AotError(f'--sweep {spec!r}: expected KEY=V1,V2,..., e.g. global_batch_size=8,16,32')
  problem = config_file.unknown_config_key(config, key, f'--sweep {spec}')
  if problem:
    raise AotError(problem)
  node = config
  *path, last = key.split('.')
  for part in path:
    node = node[part]
  old = node[last]
  out = []
  for text in values.split(','):
    try:
      if isinstance(old, bool):
        if text.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(text)
        value = text.lower() in ('true', '1')
      elif isinstance(old, (int, float, str)):
        value = type(old)(text)
      else:
        raise AotError(f'--sweep {key}: only number, text or true/false keys can be swept')
    except ValueError:
      raise AotError(f'--sweep {key}: {text!r} is not of type {type(old).__name__}') from None
    config_file.check_values(with_value(config, key, value))
    out.append(value)
  return key, out


def with_value(config, key: str, value):
  """A copy of ``config`` with ``key`` (dotted) set to ``value``."""
  config = copy.deepcopy(config)
  node = config
  *path, last = key.split('.')
  for part in path:
    node = node[part]
  node[last] = value
  return config


def sweep_row(key: str, value, result: dict) -> dict:
  """One line of ``--sweep``'s table."""
  m = result['per_chip']
  return {
    key: value,
    'gib_per_chip': m['memory_gib']['peak'],
    'fits': m['memory_gib']['fits'],
    'hbm_traffic_gb': m['hbm_traffic']['bytes_padded'] / 1e9,
    'bound_ms': m['roofline_seconds']['bound'] * 1e3,
    'limited_by': m['roofline_seconds']['limited_by'],
    'images_per_second_upper_bound': result['images_per_second_upper_bound'],
    'mfu_upper_bound': m['mfu_upper_bound'],
    'compile_s': result['timings']['compile_s'],
  }


def format_table(rows: list[dict]) -> str:
  """Rows of equal keys as a Markdown table."""
  keys = list(rows[0])
  fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  lines += ['| ' + ' | '.join(fmt(r[k]) for k in keys) + ' |' for r in rows]
  return '\n'.join(lines)


def format_breakdown(traffic: dict, top: int) -> str:
  """The audit as text: totals, by kind, by source and the top instructions."""
  gb = lambda b: b / 1e9
  lines = [
    f'HBM traffic per chip: {gb(traffic["bytes_padded"]):.2f} GB tile-padded '
    f'({gb(traffic["bytes"]):.2f} GB raw)',
    '',
    'by kind (GB padded, instructions):',
  ]
  lines += [
    f'  {k:24s} {gb(v["bytes_padded"]):8.3f}  {v["count"]}' for k, v in traffic['by_kind'].items()
  ]
  lines += ['', f'by source, top {top}:']
  lines += [
    f'  {k[:72]:72s} {gb(v["bytes_padded"]):8.3f}  {v["count"]}'
    for k, v in list(traffic['by_source'].items())[:top]
  ]
  lines += ['', f'top {top} instructions (GB padded, executions):']
  lines += [
    f'  {r["bytes_padded"] / 1e9:8.3f} x{r["times"]:<4.0f} {r["kind"]:20s} {r["name"][:28]:28s} '
    f'{r["shape"][:44]:44s} {r["source"][:60]}'
    for r in traffic['top'][:top]
  ]
  loops = [
    f'{l["body"]} x{l["trips"]}{"" if l["known"] else " (data-dependent: assumed)"}'
    for l in traffic['loops']
  ]
  if loops:
    lines += ['', 'loops: ' + ', '.join(loops)]
  return '\n'.join(lines)


@errors.command
def main(argv):
  from absl import flags

  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments {argv[1:]}')
  h, _, w = flags_.image_size.partition('x')
  if not (h.isdigit() and (w or h).isdigit()):
    raise AotError(f'--image_size {flags_.image_size!r}: expected HxW, e.g. 512x683')
  if flags_.breakdown < 0:
    raise AotError(f'--breakdown {flags_.breakdown}: expected a number of instructions >= 0')
  config_file.check_values(flags_.config)
  kwargs = dict(
    num_classes=flags_.num_classes,
    image_size=(int(h), int(w or h)),
    breakdown=max(flags_.breakdown, 10),
  )
  if flags_.sweep:
    key, values = parse_sweep(flags_.config, flags_.sweep)
    results = []
    for value in values:
      results.append(
        run(with_value(flags_.config, key, value), flags_.target, flags_.program, **kwargs)
      )
      print(f'{key}={value}: compiled in {results[-1]["timings"]["compile_s"]:.0f} s', flush=True)
      if flags_.breakdown:
        print(
          format_breakdown(results[-1]['per_chip']['hbm_traffic'], flags_.breakdown), flush=True
        )
    rows = [sweep_row(key, v, r) for v, r in zip(values, results)]
    _write(flags_.json, {'sweep': key, 'rows': rows, 'results': results})
    print(format_table(rows))
    return
  result = run(flags_.config, flags_.target, flags_.program, **kwargs)
  _write(flags_.json, result)
  m = result['per_chip']
  if flags_.breakdown:
    print(format_breakdown(m['hbm_traffic'], flags_.breakdown))
  if not flags_.json:
    print(json.dumps(result, indent=1, default=float))
    return
  print(
    f'{result["program"]} on {result["target"]}: {m["memory_gib"]["peak"]:.2f} GiB a chip '
    f'(fits {m["memory_gib"]["fits"]}), {m["flops"]:.3g} FLOP, HBM traffic '
    f'{m["hbm_traffic"]["bytes_padded"] / 1e9:.2f} GB, bound '
    f'{m["roofline_seconds"]["bound"] * 1e3:.1f} ms ({m["roofline_seconds"]["limited_by"]}), '
    f'compile {result["timings"]["compile_s"]:.0f} s -> {flags_.json}'
  )


def _write(path, obj):
  if path:
    with open(path, 'w') as f:
      f.write(json.dumps(obj, indent=1, default=float) + '\n')


if __name__ == '__main__':
  from absl import app, flags, logging
  from ml_collections import config_flags

  sys.argv = config_file.prepare_argv(sys.argv)
  config_flags.DEFINE_config_file('config', config_file.DEFAULT, 'Training configuration file.')
  flags.DEFINE_string('target', 'tpu:v5e:2x2', 'tpu:GENERATION:TOPOLOGY, e.g. tpu:v5e:2x2.')
  flags.DEFINE_enum('program', 'train', ['train', 'eval'], 'The train step or the evaluator.')
  flags.DEFINE_string('json', None, 'Write the figures to this file (else print them).')
  flags.DEFINE_integer('num_classes', 0, 'Classes, when the dataset does not fix them.')
  flags.DEFINE_string('image_size', '512x683', 'HxW of the image the eval program is built for.')
  flags.DEFINE_integer(
    'breakdown',
    0,
    'Print the HBM traffic audit: by kind, by source and '
    'the top N instructions (the JSON holds at least the top 10).',
  )
  flags.DEFINE_string(
    'sweep',
    None,
    'KEY=V1,V2,...: compile once per value of a config key '
    '(e.g. global_batch_size=8,16,32,64) and print one row per value.',
  )
  logging.set_verbosity(logging.WARNING)
  app.run(main)
