"""Reading an optimised, scheduled HLO module (``compiled.as_text()``): its collectives and
its HBM traffic, instruction by instruction.

Why not XLA's ``cost_analysis()['bytes accessed']``: on TPU it counts every operand and
result of every instruction whole, wherever it lives, so an array the compiler kept in
VMEM (memory space ``S(1)``), a slice read out of a larger array, an in-place
dynamic-update-slice and both halves of an asynchronous copy all count as if they crossed
HBM in full; and the body of a loop counts once. ``hbm_traffic`` counts instead, for every
instruction of the entry computation (loop bodies once per trip):

- operands read and results written, only those in HBM (default memory space; ``S(n)``
  with n >= 1 is VMEM, SMEM, sync flags or host memory);
- an asynchronous pair once: the ``-start`` reads its operands, the ``-done`` writes its
  result;
- a slice (``slice``, ``dynamic-slice``, also inside a fusion or an ``async-start``) as the
  slice it reads, an in-place ``dynamic-update-slice`` as the update it writes;
- bitcasts, tuples, get-tuple-element, parameters and constants as no traffic (their
  consumers read them);
- both raw (logical element counts) and padded to the tiles its layout states
  (``{...:T(8,128)}``: the two most minor dimensions rounded up to 8 and 128), which is what
  the chip moves.

It does not see traffic inside a fusion that the compiler streams through VMEM on its own
(a convolution's operand re-read per output tile, spills): a lower bound on those, exact on
the instructions' boundaries.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'bf16': 2,
  'f16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'c64': 8,
  'c128': 16,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  's4': 0.5,
  'u4': 0.5,
}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
# Instructions that move no data of their own.
_FREE = {
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'after-all',
  'partition-id',
  'replica-id',
  'opt-barrier',
  'add-dependency',
  'domain',
}
_SLICES = {'slice', 'dynamic-slice'}

_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([^{}]*)\})?')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


# ---- parsing ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of an HLO shape: dtype, dimensions, layout (minor-to-major), first tile,
  memory space."""

  dtype: str
  dims: tuple[int, ...]
  minor_to_major: tuple[int, ...] = ()
  tile: tuple[int, ...] = ()
  memory_space: int = 0

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def nbytes(self) -> float:
    return self.elements * DTYPE_BYTES.get(self.dtype, 0)

  @property
  def padded_elements(self) -> int:
    """Elements once the most minor dimensions are rounded up to the tile."""
    if not self.tile:
      return self.elements
    dims = list(self.dims)
    order = list(self.minor_to_major) or list(range(len(dims)))[::-1]
    extra = 1
    for i, t in enumerate(reversed(self.tile)):
      if i < len(order):
        d = order[i]
        dims[d] = -(-dims[d] // t) * t
      else:  # a tile of higher rank than the array: the missing dimensions are 1, padded
        extra *= t
    return math.prod(dims) * extra

  @property
  def padded_nbytes(self) -> float:
    return self.padded_elements * DTYPE_BYTES.get(self.dtype, 0)

  @property
  def in_hbm(self) -> bool:
    return self.memory_space == 0


def parse_arrays(shape: str) -> list[Array]:
  """Every array of an HLO shape (a tuple's in order), with its layout if printed."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      continue
    dims_t = tuple(int(d) for d in dims.split(',') if d)
    m2m, tile, space = (), (), 0
    if layout:
      order, _, attrs = layout.partition(':')
      m2m = tuple(int(d) for d in order.split(',') if d.strip().isdigit())
      t = re.search(r'T\(([0-9,]+)\)', attrs)
      tile = tuple(int(x) for x in t.group(1).split(',')) if t else ()
      s = re.search(r'S\((\d+)\)', attrs)
      space = int(s.group(1)) if s else 0
    out.append(Array(dtype, dims_t, m2m, tile, space))
  return out


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  is_root: bool = False
  args: str = ''  # the text inside the parentheses: a constant's value, a parameter's number

  @property
  def arrays(self) -> list[Array]:
    return parse_arrays(self.shape)

  def attr(self, key: str) -> str | None:
    m = re.search(rf'\b{key}=%?([\w.\-]+)', self.attrs)
    return m.group(1) if m else None

  def called(self) -> list[str]:
    """Computations this instruction calls (fusion, while body, async wrapped op, ...)."""
    names = re.findall(
      r'\b(?:calls|to_apply|body|condition|true_computation|'
      r'false_computation)=%?([\w.\-]+)',
      self.attrs,
    )
    m = re.search(r'branch_computations=\{([^}]*)\}', self.attrs)
    if m:
      names += re.findall(r'%?([\w.\-]+)', m.group(1))
    return names


def _split_shape(text: str) -> tuple[str, str]:
  """'<shape> <opcode>(...)' -> (shape, rest); shapes may be nested tuples with layouts."""
  depth = 0
  for i, ch in enumerate(text):
    depth += ch in '({[' and 1 or (ch in ')}]' and -1 or 0)
    if ch == ' ' and depth == 0:
      return text[:i], text[i + 1 :]
  return text, ''


def _operands_and_attrs(rest: str, opcode: str) -> tuple[list[str], str, str]:
  args = rest[len(opcode) :]
  if not args.startswith('('):
    return [], args, ''
  depth = 0
  for i, ch in enumerate(args):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return re.findall(r'%([\w.\-]+)', args[1:i]), args[i + 1 :], args[1:i]
  return re.findall(r'%([\w.\-]+)', args), '', args[1:]


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str
  frames: dict[int, tuple[str, int, str, int]]  # frame id -> (file, line, function, parent)

  def instructions(self, computation: str) -> dict[str, Instruction]:
    return {i.name: i for i in self.computations.get(computation, [])}

  def source(self, inst: Instruction, prefix: str = 'pspnet_jax/') -> str:
    """The innermost frame of ``inst``'s stack in a file under ``prefix``
    (``pspnet_jax/train/loss.py:127 body``), else its ``op_name``."""
    m = re.search(r'stack_frame_id=(\d+)', inst.attrs)
    frame = int(m.group(1)) if m else 0
    seen = set()
    while frame in self.frames and frame not in seen:
      seen.add(frame)
      file, line, function, parent = self.frames[frame]
      if prefix in file:
        return f'{file[file.index(prefix) :]}:{line} {function.rsplit(".", 1)[-1]}'
      frame = parent
    m = re.search(r'op_name="([^"]*)"', inst.attrs)
    return m.group(1) if m else '?'


def parse(text: str) -> Module:
  """The computations of an HLO module's text, and its stack-frame table if printed."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = '', None
  tables: dict[str, dict[int, str]] = {}
  table = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      table = tables.setdefault(line, {})
      continue
    if table is not None:
      m = re.match(r'^(\d+) (.*)$', line)
      if m:
        table[int(m.group(1))] = m.group(2)
        continue
      table = None
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if current is None or line.startswith('}'):
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    root, name, body = m.groups()
    shape, rest = _split_shape(body)
    opcode = rest.split('(', 1)[0].strip()
    operands, attrs, args = _operands_and_attrs(rest, opcode)
    computations[current].append(
      Instruction(name, shape, opcode, operands, attrs, bool(root), args)
    )
  return Module(computations, entry, _frames(tables))


def _frames(tables) -> dict[int, tuple[str, int, str, int]]:
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  functions = {k: v.strip('"') for k, v in tables.get('FunctionNames', {}).items()}
  locations = {}
  for k, v in tables.get('FileLocations', {}).items():
    f = re.search(r'file_name_id=(\d+)', v)
    fn = re.search(r'function_name_id=(\d+)', v)
    ln = re.search(r'\bline=(\d+)', v)
    locations[k] = (
      files.get(int(f.group(1)), '?') if f else '?',
      int(ln.group(1)) if ln else 0,
      functions.get(int(fn.group(1)), '?') if fn else '?',
    )
  frames = {}
  for k, v in tables.get('StackFrames', {}).items():
    loc = re.search(r'file_location_id=(\d+)', v)
    parent = re.search(r'parent_frame_id=(\d+)', v)
    file, line, function = locations.get(int(loc.group(1)), ('?', 0, '?')) if loc else ('?', 0, '?')
    p = int(parent.group(1)) if parent else 0
    frames[k] = (file, line, function, p if p != k else 0)
  return frames


# ---- collectives ------------------------------------------------------------------------


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
  module = parse(hlo_text)
  loop_bodies = {
    i.attr('body') for comp in module.computations.values() for i in comp if i.opcode == 'while'
  }
  out = []
  for computation, instructions in module.computations.items():
    shapes = {i.name: i.shape for i in instructions}
    for inst in instructions:
      op = inst.opcode
      base = op[: -len('-start')] if op.endswith('-start') else op
      if base not in COLLECTIVES:
        continue
      arrays = [a for o in inst.operands if o in shapes for a in parse_arrays(shapes[o])]
      if not arrays:
        arrays = inst.arrays[:1] if op != base else inst.arrays
      by_dtype: dict[str, int] = {}
      for a in arrays:
        by_dtype[a.dtype] = by_dtype.get(a.dtype, 0) + a.elements
      for dtype, n in sorted(by_dtype.items()):
        out.append(
          {
            'op': base,
            'dtype': dtype,
            'elements': n,
            'bytes': n * DTYPE_BYTES[dtype],
            'group': _group_size(inst.attrs, num_devices),
            'in_loop': computation in loop_bodies,
          }
        )
  return out


# ---- HBM traffic ------------------------------------------------------------------------


def trip_count(module: Module, loop: Instruction, caller: dict[str, Instruction]) -> int | None:
  """A while loop's trip count: XLA's ``known_trip_count`` if printed, else from a
  condition ``counter < constant`` whose counter starts at a constant (jax's scans and
  fori_loops with static bounds); None when it depends on data."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if m:
    return int(m.group(1))
  cond = module.instructions(loop.attr('condition') or '')
  root = next((i for i in cond.values() if i.is_root), None)
  if root is None or root.opcode != 'compare' or 'direction=LT' not in root.attrs:
    return None
  counter, bound = (cond.get(o) for o in root.operands[:2])
  if not (
    counter and bound and counter.opcode == 'get-tuple-element' and bound.opcode == 'constant'
  ):
    return None
  index = int(re.search(r'index=(\d+)', counter.attrs).group(1))
  limit = _constant(bound)
  init = caller.get(loop.operands[0]) if loop.operands else None
  start = 0
  if init is not None and init.opcode == 'tuple' and index < len(init.operands):
    value = caller.get(init.operands[index])
    while value is not None and value.opcode == 'copy':
      value = caller.get(value.operands[0])
    start = _constant(value) if value is not None and value.opcode == 'constant' else None
  if limit is None or start is None:
    return None
  return max(limit - start, 0)


def _constant(inst: Instruction) -> int | None:
  m = re.fullmatch(r'\s*(-?\d+)\s*', inst.args)
  return int(m.group(1)) if m else None


def _contains(module: Module, computation: str, opcodes: set[str], depth: int = 0) -> bool:
  for inst in module.computations.get(computation, []):
    if inst.opcode in opcodes:
      return True
    if depth < 4 and any(_contains(module, c, opcodes, depth + 1) for c in inst.called()):
      return True
  return False


def kind_of(module: Module, inst: Instruction) -> str:
  """The audit's groups: convolution fusion, gather, elementwise fusion, copy, async copy,
  async slice, slice, collective, pad, or the opcode."""
  op = inst.opcode
  base = (
    op[: -len('-start')]
    if op.endswith('-start')
    else op[: -len('-done')]
    if op.endswith('-done')
    else op
  )
  if base in COLLECTIVES:
    return 'collective'
  if base == 'copy' and op != base:
    return 'async copy'
  if _is_async_slice(module, inst) or base in ('slice', 'dynamic-slice') and op != base:
    return 'async slice'
  if base == 'async':
    return 'async other'
  called = inst.called()
  if op in ('fusion', 'convolution', 'dot'):
    if op != 'fusion' or any(_contains(module, c, {'convolution', 'dot'}) for c in called):
      return 'convolution fusion'
    if any(_contains(module, c, {'gather', 'scatter'}) for c in called):
      return 'gather'
    return 'elementwise fusion'
  if op in ('gather', 'scatter'):
    return 'gather'
  if op in _SLICES:
    return 'slice'
  return op


def _is_async_slice(module: Module, inst: Instruction) -> bool:
  """``slice-start`` / ``dynamic-slice-start``, or an ``async-start`` wrapping a slice."""
  op = inst.opcode
  if op in ('slice-start', 'dynamic-slice-start'):
    return True
  if op != 'async-start':
    return False
  for c in inst.called():
    root = next((i for i in module.computations.get(c, []) if i.is_root), None)
    if root is not None and root.opcode in _SLICES:
      return True
  return False


def _fusion_io(
  module: Module, inst: Instruction, operand_arrays: list[list[Array]]
) -> tuple[list[tuple[Array, float]], float]:
  """What a fusion reads, per operand array (the whole array, nothing for a buffer it
  updates in place, or only the slices its parameter feeds), and the fraction of its
  results it writes (an in-place dynamic-update-slice root writes the update only)."""
  body = module.computations.get(inst.attr('calls') or '', [])
  by_name = {i.name: i for i in body}
  params = {
    i.name: _constant(i) if _constant(i) is not None else n
    for n, i in enumerate(i for i in body if i.opcode == 'parameter')
  }
  users: dict[str, list[Instruction]] = {}
  for i in body:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = next((i for i in body if i.is_root), None)
  roots = (
    [by_name.get(o) for o in root.operands]
    if root is not None and root.opcode == 'tuple'
    else [root]
  )
  updates = [
    r
    for r in roots
    if r is not None and r.opcode == 'dynamic-update-slice' and r.operands[0] in params
  ]
  in_place = {params[r.operands[0]] for r in updates}

  def slices_of(name: str, depth: int = 0) -> list[Instruction] | None:
    """The slices that are the only readers of ``name`` (through bitcasts), else None."""
    found = []
    for u in users.get(name, []):
      if u.opcode in _SLICES and u.operands[0] == name:
        found.append(u)
      elif u.opcode == 'bitcast' and depth < 4:
        inner = slices_of(u.name, depth + 1)
        if inner is None:
          return None
        found += inner
      else:
        return None
    return found or None

  sliced = {}
  for name, k in params.items():
    slices = slices_of(name)
    if slices:
      sliced[k] = sum(sum(a.elements for a in u.arrays) for u in slices)
  reads = []
  for k, arrays in enumerate(operand_arrays):
    for a in arrays:
      if k in in_place:
        reads.append((a, 0.0))
      elif k in sliced and a.elements:
        reads.append((a, min(sliced[k] / a.elements, 1.0)))
      else:
        reads.append((a, 1.0))
  written = 1.0
  total = sum(a.elements for a in inst.arrays)
  if updates and total:
    update = sum(
      sum(a.elements for a in by_name[r.operands[1]].arrays)
      for r in updates
      if r.operands[1] in by_name
    )
    written = min(update / total, 1.0)
  return reads, written


def hbm_traffic(hlo_text: str, *, unknown_trips: int = 1, top: int = 10) -> dict:
  """The program's HBM bytes per execution (see the module docstring for what counts):
  ``bytes`` (raw) and ``bytes_padded`` (tile-padded), ``by_kind`` and ``by_source`` (both
  ``{key: {'bytes', 'bytes_padded', 'count'}}``), the ``top`` instructions by padded bytes,
  and ``loops`` (each while body with its trip count; a data-dependent one counts
  ``unknown_trips`` times, ``known: False``)."""
  module = parse(hlo_text)
  rows: list[dict] = []
  loops: list[dict] = []

  def source(inst: Instruction, users: dict[str, list[Instruction]]) -> str:
    """Where ``inst`` comes from in the JAX program; an instruction the compiler added
    (a prefetch, a layout copy without metadata) is charged to its first user that has one."""
    queue, seen = [inst], set()
    while queue:
      i = queue.pop(0)
      if i.name in seen or len(seen) > 64:
        continue
      seen.add(i.name)
      where = module.source(i)
      if where != '?':
        return where
      queue.extend(users.get(i.name, []))
    return '?'

  def walk(computation: str, times: float):
    instructions = module.instructions(computation)
    users: dict[str, list[Instruction]] = {}
    for i in module.computations.get(computation, []):
      for o in i.operands:
        users.setdefault(o, []).append(i)
    for inst in module.computations.get(computation, []):
      op = inst.opcode
      if op == 'while':
        trips = trip_count(module, inst, instructions)
        loops.append(
          {
            'body': inst.attr('body'),
            'trips': trips if trips is not None else unknown_trips,
            'known': trips is not None,
            'times': times,
          }
        )
        walk(inst.attr('body'), times * (trips if trips is not None else unknown_trips))
        continue
      if op == 'call':
        walk(inst.attr('to_apply'), times)
        continue
      if op == 'conditional':
        # The costlier branch: an upper bound for a branch taken at run time.
        before = len(rows)
        best: list[dict] = []
        for branch in inst.called():
          del rows[before:]
          walk(branch, times)
          if sum(r['bytes_padded'] for r in rows[before:]) >= sum(r['bytes_padded'] for r in best):
            best = rows[before:]
        del rows[before:]
        rows.extend(best)
        continue
      if op in _FREE or (op == 'custom-call' and 'AllocateBuffer' in inst.attrs):
        continue
      raw, padded = _instruction_bytes(module, inst, instructions)
      if raw or padded:
        rows.append(
          {
            'name': inst.name,
            'opcode': op,
            'kind': kind_of(module, inst),
            'source': source(inst, users),
            'shape': re.sub(r'\{[^{}]*\}', '', inst.shape)[:120],
            'times': times,
            'bytes': raw * times,
            'bytes_padded': padded * times,
          }
        )

  walk(module.entry, 1.0)

  def group(key):
    out: dict[str, dict] = {}
    for r in rows:
      g = out.setdefault(r[key], {'bytes': 0.0, 'bytes_padded': 0.0, 'count': 0})
      g['bytes'] += r['bytes']
      g['bytes_padded'] += r['bytes_padded']
      g['count'] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]['bytes_padded']))

  return {
    'bytes': sum(r['bytes'] for r in rows),
    'bytes_padded': sum(r['bytes_padded'] for r in rows),
    'by_kind': group('kind'),
    'by_source': group('source'),
    'top': sorted(rows, key=lambda r: -r['bytes_padded'])[:top],
    'loops': loops,
  }


def _instruction_bytes(
  module: Module, inst: Instruction, scope: dict[str, Instruction]
) -> tuple[float, float]:
  """(raw, padded) HBM bytes one execution of ``inst`` reads and writes."""
  op = inst.opcode
  operand_arrays = [scope[o].arrays if o in scope else [] for o in inst.operands]
  results = inst.arrays
  raw = padded = 0.0

  def read(a: Array, fraction: float = 1.0):
    nonlocal raw, padded
    if a.in_hbm:
      raw += a.nbytes * fraction
      padded += a.padded_nbytes * fraction

  def write(arrays, fraction: float = 1.0):
    for a in arrays:
      read(a, fraction)

  if op.endswith('-done'):
    write(results)  # the -start read the operands
    return raw, padded
  if op.endswith('-start'):
    if _is_async_slice(module, inst):
      # Reads only the slice. The start's shape is ((operand), slice, context): the slice
      # is the first array after the operand's.
      source = operand_arrays[0][:1] if operand_arrays else []
      sliced = results[1].elements if len(results) > 1 else 0
      for a in source:
        read(a, min(sliced / a.elements, 1.0) if a.elements else 0.0)
      return raw, padded
    for arrays in operand_arrays:
      for a in arrays:
        read(a)
    return raw, padded
  if op in _SLICES:
    out = sum(a.elements for a in results)
    for a in operand_arrays[0] if operand_arrays else []:
      read(a, min(out / a.elements, 1.0) if a.elements else 0.0)
    write(results)
    return raw, padded
  if op == 'dynamic-update-slice':
    update = operand_arrays[1] if len(operand_arrays) > 1 else []
    for a in update:
      read(a)
    n = sum(a.elements for a in update)
    write(results, n / max(sum(a.elements for a in results), 1))
    return raw, padded
  if op == 'fusion':
    reads, written = _fusion_io(module, inst, operand_arrays)
    for a, fraction in reads:
      read(a, fraction)
    write(results, written)
    return raw, padded
  for arrays in operand_arrays:
    for a in arrays:
      read(a)
  write(results)
  return raw, padded
