"""The one module that reads and writes checkpoints (orbax). Nobody else touches the format.

A *model directory* holds one model: ``model_config.json`` (``PSPNetConfig``) and
``state/`` (an orbax checkpoint of the model's parameters and BN statistics as a nested
dict of arrays, keyed like ``nnx.to_pure_dict``). The port CLI writes one.

A *training workdir* holds ``model_config.json`` and ``checkpoints/<step>/`` written by an
orbax ``CheckpointManager`` (``TrainCheckpointer``) with the items ``model`` (same format as
``state/``), ``opt_state``, ``meta`` (step, epoch, ...) and ``data_state`` (the input pipeline's
position, one JSON for all processes: it is the same on each, so a run resumes on another
number of processes; checkpoints written before it hold ``data``, one grain JSON file per
process, still read), and ``metrics`` (the step's validation mIoU, where it has one).
``load_model`` reads a model directory, a training workdir (its latest step) or one step
directory of it.

A step that fails to restore for a reason in its files (missing, truncated, unreadable
data) is *damaged*: the newest intact step is used instead. A failure of the reader's
surroundings (permission, memory, a storage that times out) is not: it stops with one
line and every step is left as it is. In a multi-process run every process restores the
same step: the newest that restores on all of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from pspnet_jax import _compat
from pspnet_jax.errors import STORAGE_ERRNOS, UserError
from pspnet_jax.mesh import per_process
from pspnet_jax.models import PSPNet, PSPNetConfig

MODEL_CONFIG = 'model_config.json'
STATE_DIR = 'state'
CHECKPOINTS_DIR = 'checkpoints'


class CheckpointError(UserError):
  """A path is not a checkpoint this project can read; the message says what was found."""


class DamagedCheckpoint(CheckpointError):
  """A step whose files do not restore (``newest_intact`` skips it)."""


# Failures that say nothing about the files (besides a full or read-only disk,
# ``_storage_cause``): the checkpoint is left as it is.
_SURROUNDINGS_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOMEM, errno.ETIMEDOUT, errno.EAGAIN)
_SURROUNDINGS_TEXT = (
  'PERMISSION_DENIED',
  'Permission denied',
  'DEADLINE_EXCEEDED',
  'UNAVAILABLE',
  'Cannot allocate memory',
)


def _chain(error: BaseException | None):
  """``error`` and its causes (``__cause__``, else ``__context__``), each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _restore_failure(error: BaseException, message: str) -> CheckpointError:
  """``message`` (and the innermost cause) as a ``DamagedCheckpoint``, or as a plain
  ``CheckpointError`` when the cause is the reader's surroundings, not the files."""
  surroundings = _storage_cause(error) or any(
    isinstance(e, MemoryError)
    or (isinstance(e, OSError) and e.errno in _SURROUNDINGS_ERRNOS)
    or any(t in str(e) for t in _SURROUNDINGS_TEXT)
    for e in _chain(error)
  )
  if not surroundings:
    return DamagedCheckpoint(f'{message} ({_cause(error)})')
  return CheckpointError(
    f'{message} ({_cause(error)}); this is no fault of its files, which are left as they '
    'are: fix the cause and run again'
  )


DAMAGED_SUFFIX = '.damaged'
DIVERGED_SUFFIX = '.diverged'


class _StorageErrorFilter(logging.Filter):
  """orbax logs a failed background write from each of its threads, with a traceback,
  before raising it; a full or read-only disk is then reported as one line by
  ``TrainCheckpointer`` (the logs stay under PSPNET_DEBUG)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if os.environ.get('PSPNET_DEBUG'):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (
      (error is not None and _storage_cause(error))
      or _storage_cause(Exception(record.getMessage()))
    )


def _cause(error: BaseException) -> str:
  """The innermost cause of an orbax / TensorStore failure, on one line, without the
  source-location and spec dumps that follow it."""
  *_, root = _chain(error)
  text = ' '.join(str(root).split())
  text = re.split(r' \[source locations=| \[tensorstore_spec| \{\"', text)[0]
  return f'{type(root).__name__}: {text[:400]}'


TMP_MARK = '.orbax-checkpoint-tmp'  # in the name of a save still being written


def _storage_cause(error: BaseException) -> str | None:
  """'no space left' / 'read-only file system' when ``error`` (or a cause of it) says the
  storage refused a write, else None."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return 'read-only file system' if e.errno == errno.EROFS else 'no space left'
    text = str(e)
    if 'No space left' in text or 'RESOURCE_EXHAUSTED' in text or 'Disk quota exceeded' in text:
      return 'no space left'
    if 'Read-only file system' in text:
      return 'read-only file system'
  return None


def newest_intact(directory: str, steps: list[int], restore, *, all_processes: bool = False):
  """``(step, restore(step))`` for the newest step that restores; each damaged newer one
  is named on stderr with its cause. CheckpointError when none restores, or at once when a
  restore fails for a reason outside the files. ``all_processes``: called by every process
  of a multi-process job, which then agree on one step (the newest that restores on all)."""
  damaged = []
  for step in sorted(steps, reverse=True):
    error, result = None, None
    try:
      result = restore(step)
    except CheckpointError as e:
      error = e
    if all_processes:
      error = _agreed(error, os.path.join(directory, str(step)))
    if isinstance(error, DamagedCheckpoint):
      damaged.append(step)
      print(
        f'warning: {os.path.join(directory, str(step))} is damaged, skipped: {error}',
        file=sys.stderr,
        flush=True,
      )
      continue
    if error is not None:
      raise error
    if damaged:
      print(
        f'warning: using step {step}, the newest intact checkpoint in {directory}',
        file=sys.stderr,
        flush=True,
      )
    return step, result
  raise CheckpointError(
    f'{directory}: no intact checkpoint (damaged: steps '
    f'{", ".join(map(str, damaged))}; see the warnings above)'
  )


def _agreed(error: CheckpointError | None, path: str) -> CheckpointError | None:
  """This process's outcome of restoring ``path``, made the same on every process: a
  failure elsewhere fails here too (damaged or not, as there)."""
  code = 0 if error is None else 1 if isinstance(error, DamagedCheckpoint) else 2
  codes = per_process(code)
  worst = int(codes.max())  # a failure outside the files anywhere stops every process
  if worst == code:
    return error
  where = ', '.join(str(i) for i, c in enumerate(codes) if c == worst)
  kind = DamagedCheckpoint if worst == 1 else CheckpointError
  return kind(f'{path} does not restore on process(es) {where} (see their messages)')


def model_variables(model: PSPNet) -> dict:
  """Parameters and BN statistics as a nested dict of arrays (what is saved)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def abstract_model(config: PSPNetConfig) -> PSPNet:
  """A PSPNet whose arrays are ShapeDtypeStructs: no initialisation cost."""
  return nnx.eval_shape(lambda: PSPNet(config, rngs=nnx.Rngs(0)))


def create_model(config: PSPNetConfig, seed: int = 0) -> PSPNet:
  """A freshly initialised PSPNet; initialisation runs as one compiled program."""
  return nnx.jit(lambda: PSPNet(config, rngs=nnx.Rngs(seed)))()


def save_model(directory: str | os.PathLike, model: PSPNet, metadata: dict | None = None) -> str:
  """Writes a model directory; returns its absolute path. It is written beside
  ``directory`` and moved into place when complete: an interrupted or failed save leaves
  ``directory`` as it was (an earlier model in it included)."""
  directory = os.path.abspath(os.fspath(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.', dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(staging, STATE_DIR), model_variables(model), force=True)
      ckptr.wait_until_finished()
    write_model_config(staging, model.config, metadata)
    os.makedirs(directory, exist_ok=True)
    for name in (STATE_DIR, MODEL_CONFIG):  # the config last: it marks a complete model
      target = os.path.join(directory, name)
      if os.path.isdir(target):  # an earlier model's: moved aside (removed with the staging)
        os.replace(target, os.path.join(staging, f'old_{name}'))
      os.replace(os.path.join(staging, name), target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def write_model_config(directory: str, config: PSPNetConfig, metadata: dict | None = None):
  payload = {'model': config.to_dict(), **({'metadata': metadata} if metadata else {})}
  tmp = os.path.join(directory, MODEL_CONFIG + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MODEL_CONFIG))


def read_model_config(directory: str) -> tuple[PSPNetConfig, dict]:
  path = os.path.join(directory, MODEL_CONFIG)
  try:
    with open(path) as f:
      payload = json.load(f)
    return PSPNetConfig.from_dict(payload['model']), payload.get('metadata', {})
  except FileNotFoundError:
    raise CheckpointError(
      f'{directory}: no {MODEL_CONFIG}; not a pspnet_jax model directory'
    ) from None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: unreadable model config ({e})') from None


def _config_directory(path: str | os.PathLike) -> str:
  """Where the model config of a model directory, a training workdir or one of its steps is."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(os.path.join(path, MODEL_CONFIG)) and os.path.isdir(
    os.path.join(path, 'model')
  ):
    path = os.path.dirname(os.path.dirname(path))  # workdir/checkpoints/<step>
  return path


def model_metadata(path: str | os.PathLike) -> dict:
  """The metadata kept beside a model directory, a training workdir or one of its steps."""
  return read_model_config(_config_directory(path))[1]


def model_config(path: str | os.PathLike) -> PSPNetConfig:
  """The config of a model directory, a training workdir or one of its steps (no weights read)."""
  return read_model_config(_config_directory(path))[0]


def metadata_value(metadata: dict, key: str):
  """``key`` (e.g. ``class_names``, ``palette``) from a model's metadata, at its top level
  or under ``dataset``; None when absent."""
  if key in metadata:
    return metadata[key]
  dataset = metadata.get('dataset')
  return dataset.get(key) if isinstance(dataset, dict) else None


def check_workdir(workdir: str, config: PSPNetConfig):
  """Refuses a training workdir, before anything is written to it, that is a file, or that
  holds checkpoints of another architecture (each differing field named). The compute
  dtype and dropout may change on resume."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f'--workdir {workdir} is a file (give a directory)')
  if not (
    os.path.exists(os.path.join(workdir, MODEL_CONFIG))
    and _steps(os.path.join(workdir, CHECKPOINTS_DIR))
  ):
    return
  saved, _ = read_model_config(workdir)
  diff = [
    f'{k} {v!r} (workdir) vs {getattr(config, k)!r} (asked)'
    for k, v in saved.to_dict().items()
    if k not in ('dtype', 'dropout') and v != getattr(config, k)
  ]
  if diff:
    raise CheckpointError(
      f'{workdir} holds checkpoints of another model: {"; ".join(diff)} (resume with the '
      'model config it was trained with, or give a new --workdir)'
    )


def restore_variables(state_dir: str, config: PSPNetConfig) -> PSPNet:
  """Builds a PSPNet of ``config`` holding the variables saved in orbax dir ``state_dir``."""
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  # Restore onto this process's first device, whatever topology wrote the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state)
  )
  _compat.quiet_abandoned_orbax_reads()  # installed before: the leftovers may report while it fails
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, target)
  except Exception as e:  # orbax raises many types; name the path and the cause
    raise _restore_failure(e, f'{state_dir}: cannot restore the model variables') from e
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def load_model(path: str | os.PathLike, *, all_processes: bool = False) -> PSPNet:
  """Loads a model directory, a training workdir (latest step) or a workdir's step dir.

  The model is returned in eval mode (``model(x)`` gives logits); call ``.train()`` to
  fine-tune it. ``all_processes``: every process of a multi-process job calls this, and
  from a workdir they load the same step (``newest_intact``).
  """
  model = _load_model(path, all_processes)
  model.eval()
  return model


def _load_model(path, all_processes: bool) -> PSPNet:
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such directory')
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):  # training workdir
    steps = _steps(os.path.join(path, CHECKPOINTS_DIR))
    if not steps:
      raise CheckpointError(f'{path}: training workdir without any finished checkpoint')
    config, _ = read_model_config(path)
    directory = os.path.join(path, CHECKPOINTS_DIR)
    _, model = newest_intact(
      directory,
      steps,
      lambda step: restore_variables(os.path.join(directory, str(step), 'model'), config),
      all_processes=all_processes,
    )
    return model
  if os.path.isdir(os.path.join(path, 'model')) and not os.path.exists(
    os.path.join(path, MODEL_CONFIG)
  ):
    config, _ = read_model_config(
      os.path.dirname(os.path.dirname(path))
    )  # workdir/checkpoints/<step>
    return restore_variables(os.path.join(path, 'model'), config)
  config, _ = read_model_config(path)
  if not os.path.isdir(os.path.join(path, STATE_DIR)):
    raise CheckpointError(
      f'{path}: has {MODEL_CONFIG} but neither {STATE_DIR}/ (a model directory) nor '
      f'{CHECKPOINTS_DIR}/ (a training run that saved a checkpoint): nothing to load yet '
      '(train until the first checkpoint_every_steps, or give a model directory)'
    )
  return restore_variables(os.path.join(path, STATE_DIR), config)


def _steps(directory: str) -> list[int]:
  """Finished checkpoint steps (orbax writes into temporary names and renames at the end)."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    int(n)
    for n in os.listdir(directory)
    if n.isdigit() and os.path.isdir(os.path.join(directory, n))
  )


DATA_STATE = 'data_state'  # the item of the input pipeline's position (one JSON)
_GRAIN_DATA = 'data'  # its item before: grain's handler, process_<i>-of-<n>.json each


def _grain_data_state(directory: str) -> dict:
  """The pipeline's state from a checkpoint written before ``data_state``: this process's
  file, or (another process count wrote it) any process's: the state is the same on each."""
  own = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  names = sorted(n for n in os.listdir(directory) if re.fullmatch(r'process_\d+-of-\d+\.json', n))
  if not names:
    raise FileNotFoundError(f'{directory}: no process_<i>-of-<n>.json')
  with open(os.path.join(directory, own if own in names else names[0])) as f:
    return json.load(f)


class TrainCheckpointer:
  """Preemption-safe training checkpoints in ``workdir/checkpoints``.

  Saves are asynchronous (arrays are copied off the device, then written in the
  background). Kept: the latest ``keep`` steps and the best by validation mIoU.
  """

  def __init__(
    self,
    workdir: str,
    model_config: PSPNetConfig,
    *,
    keep: int = 3,
    async_save: bool = True,
    metadata: dict | None = None,
  ):
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    if jax.process_index() == 0:
      write_model_config(self.workdir, model_config, metadata)
    policy = ocp_policy.AnyPreservationPolicy(
      [
        ocp_policy.LatestN(keep),
        ocp_policy.BestN(
          get_metric_fn=lambda m: m['miou'], n=1, keep_checkpoints_without_metrics=False
        ),
      ]
    )
    # best_fn makes orbax write each step's metrics into the step (item 'metrics'): without
    # it they live in this manager's memory only, and a resumed run, knowing no step's
    # mIoU, lets BestN delete the best checkpoint at its next save.
    logging.getLogger('absl').addFilter(_compat.NoMetricsWarningFilter())
    logging.getLogger('absl').addFilter(_StorageErrorFilter())
    # cleanup_tmp_directories: a save cut short (a second Ctrl-C, kill -9, a full disk)
    # leaves <step>.orbax-checkpoint-tmp*; the workdir lock (train.workdir) makes this run
    # the only writer, so whatever is temporary at its start is such a leftover.
    self.manager = ocp.CheckpointManager(
      os.path.join(self.workdir, CHECKPOINTS_DIR),
      options=ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda m: m['miou'],
        best_mode='max',
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )
    self._in_flight = None  # (step, bytes) of the save being written

  @property
  def directory(self) -> str:
    return os.path.join(self.workdir, CHECKPOINTS_DIR)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_newest_intact(self, **targets):
    """``restore`` from the newest step that restores, or None without checkpoints. A
    damaged newer step is named on stderr and renamed ``<step>.damaged`` (kept for
    inspection, out of the run's way). Returns ``(step, model_variables, opt_state, meta,
    data_state)``."""
    steps = list(self.manager.all_steps())
    if not steps:
      return None
    directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    step, restored = newest_intact(
      directory, steps, lambda s: self.restore(s, **targets), all_processes=True
    )
    self._set_aside([s for s in steps if s > step], DAMAGED_SUFFIX)
    return (step, *restored)

  def set_aside_diverged(self, first_step: int) -> list[int]:
    """Moves the finished checkpoints of steps >= ``first_step`` out of the run's way, to
    ``<step>.diverged`` (kept for inspection), so that a resume starts before a divergence.
    Returns those steps."""
    self.wait()
    steps = [s for s in self.manager.all_steps() if s >= first_step]
    self._set_aside(steps, DIVERGED_SUFFIX)
    return sorted(steps)

  def _set_aside(self, steps, suffix: str):
    if not steps:
      return
    directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    if jax.process_index() == 0:
      for s in steps:
        target = os.path.join(directory, f'{s}{suffix}')
        if os.path.isdir(target):  # set aside by an earlier run: this one replaces it
          shutil.rmtree(target)
        os.replace(os.path.join(directory, str(s)), target)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'checkpoints moved to {suffix}')
    self.manager.reload()

  def save(
    self,
    step: int,
    *,
    model_variables: dict,
    opt_state,
    meta: dict,
    data_state,
    metrics: dict | None = None,
  ):
    args = ocp.args.Composite(
      model=ocp.args.StandardSave(model_variables),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta),
      **{DATA_STATE: ocp.args.JsonSave(data_state)},
    )
    nbytes = sum(x.nbytes for x in jax.tree.leaves((model_variables, opt_state)))
    with self._storage_errors():  # the previous save is finished (or fails) first
      self.manager.save(step, args=args, metrics=metrics, force=True)
      self._in_flight = (step, nbytes)

  def restore(self, step: int, *, model_target: dict, opt_target):
    """Restores into the given abstract targets. Returns ``(model_variables, opt_state,
    meta, data_state)``; the data state is the input pipeline's ``get_state()`` at the save,
    which the pipeline itself judges (``TrainLoader.resume``)."""
    step_dir = os.path.join(self.directory, str(step))
    items = dict(
      model=ocp.args.StandardRestore(model_target),
      opt_state=ocp.args.StandardRestore(opt_target),
      meta=ocp.args.JsonRestore(),
    )
    written_before = not os.path.isdir(os.path.join(step_dir, DATA_STATE))
    if not written_before:
      items[DATA_STATE] = ocp.args.JsonRestore()
    _compat.quiet_abandoned_orbax_reads()
    try:
      r = self.manager.restore(step, args=ocp.args.Composite(**items))
      data = _grain_data_state(os.path.join(step_dir, _GRAIN_DATA)) if written_before else None
    except Exception as e:
      raise _restore_failure(e, f'cannot restore step {step}') from e
    return r['model'], r['opt_state'], r['meta'], data if written_before else r[DATA_STATE]

  def wait(self):
    with self._storage_errors():
      self.manager.wait_until_finished()
      self._in_flight = None

  @contextlib.contextmanager
  def _storage_errors(self):
    """A save that fails for want of space (or a read-only disk) becomes one
    ``CheckpointError``: what was needed and what is free, the partial files removed, the
    last good checkpoint named. Orbax raises it from its background writer at the next
    save or wait, as TensorStore's RESOURCE_EXHAUSTED or an OSError."""
    try:
      yield
    except Exception as e:
      cause = _storage_cause(e)
      if cause is None:
        raise
      step, nbytes = self._in_flight or (None, 0)
      self._in_flight = None
      if jax.process_index() == 0:
        for name in os.listdir(self.directory):
          if TMP_MARK in name:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      self.manager.reload()
      last = self.manager.latest_step()
      free = shutil.disk_usage(self.workdir).free
      what = (
        f'the checkpoint of step {step} (about {nbytes / 2**20:.1f} MB)'
        if step is not None
        else 'a checkpoint'
      )
      kept = (
        f'the last good checkpoint, step {last}, is kept'
        if last is not None
        else 'no earlier checkpoint exists'
      )
      raise CheckpointError(
        f'{cause} on the device holding {self.workdir} ({free / 2**20:.1f} MB free): {what} was '
        f'not written and its partial files were removed; {kept}. Free space (or lower '
        'keep_checkpoints, or give a --workdir on a larger disk) and run the same command '
        'to resume'
      ) from e

  def close(self):
    self.manager.close()
