"""The training input pipeline: grain over a prepared split, semseg's augmentation.

Every batch is a pure function of (seed, step), which gives determinism, resumption and
sharding without bookkeeping:
- epoch e visits the examples in the order ``permutation_e`` (seeded by (seed, e));
  global step s of that epoch takes positions [s*G, (s+1)*G) of it (G = global batch; the
  last partial global batch of an epoch is dropped, as semseg's drop_last);
- process i of N takes positions s*G + i*L .. s*G + (i+1)*L - 1 (L = G // N): disjoint,
  covering, and the same global batch whatever N is;
- each example's augmentation draws from ``example_rng(seed, epoch, position)``, so worker
  count and process count do not change a single pixel;
- the iterator state is just the number of batches consumed (plus what must match on
  restore), so it is JSON, independent of worker and process counts.
"""

import sys
from collections.abc import Sequence

import grain
import numpy as np

from pspnet_jax import _compat
from pspnet_jax.data import datasets
from pspnet_jax.data.transforms import AugmentConfig, augment, example_rng
from pspnet_jax.errors import UserError
from pspnet_jax.normalize import MEAN, STD


def steps_per_epoch(name: str, split: str, data_dir: str, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped each epoch)."""
  n = _split_size(name, split, data_dir)
  if not 0 < global_batch_size <= n:
    raise UserError(
      f'global_batch_size {global_batch_size} must be in 1..{n} (the size of {name}/{split})'
    )
  return n // global_batch_size


def _split_size(name, split, data_dir) -> int:
  splits = datasets.dataset_info(name, data_dir).splits
  if split not in splits:
    raise UserError(f'{name} has no split {split!r}; it has {sorted(splits)}')
  return splits[split]


class _Positions(Sequence):
  """This process's example stream: item k -> (epoch, global position, record index).

  Item k is example k % L of the process's local batch number start_step + k // L. Its
  length is sys.maxsize: the stream is endless and grain only ever indexes it.
  """

  def __init__(self, num_examples, global_batch, local_batch, process_index, seed, start_step):
    self.n, self.g, self.l = num_examples, global_batch, local_batch
    self.i, self.seed, self.start_step = process_index, seed, start_step
    self.steps = num_examples // global_batch
    self._perm = (-1, None)  # cache of the current epoch's permutation

  def __len__(self):
    return sys.maxsize

  def permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._perm = (epoch, perm)
    return perm

  def __getitem__(self, k):
    step, j = divmod(int(k), self.l)
    epoch, s = divmod(self.start_step + step, self.steps)
    position = s * self.g + self.i * self.l + j
    return epoch, position, int(self.permutation(epoch)[position])


class _LoadAndAugment:
  """(epoch, position, record index) -> {'image': float32 [c, c, 3], 'label': int32 [c, c]}."""

  def __init__(self, source: datasets.RecordSource, config: AugmentConfig, seed: int, mean, std):
    self.source, self.config, self.seed = source, config, seed
    self.mean, self.std = mean, std

  def __call__(self, item):
    epoch, position, record = item
    ex = self.source[record]
    image, label = augment(
      ex['image'],
      ex['label'],
      example_rng(self.seed, epoch, position),
      self.config,
      self.mean,
      self.std,
    )
    return {'image': image, 'label': label}


def _worker_init(worker_index: int, worker_count: int):
  del worker_index, worker_count
  import cv2  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # the workers are the parallelism; OpenCV threads would oversubscribe


class TrainLoader:
  """Endless iterator of host-local training batches with get_state()/set_state().

  Yields {'image': float32 [L, crop, crop, 3] normalised, 'label': int32 [L, crop, crop]},
  L = global_batch_size // process_count.
  """

  def __init__(
    self,
    name,
    split,
    data_dir,
    *,
    global_batch_size,
    augment_config,
    seed,
    process_index,
    process_count,
    worker_count,
    mean=MEAN,
    std=STD,
  ):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise UserError(f'seed must be a non-negative integer, got {seed!r}')
    if not 0 <= process_index < process_count:
      raise UserError(f'process_index {process_index} not in 0..{process_count - 1}')
    if global_batch_size % process_count:
      raise UserError(
        f'global_batch_size {global_batch_size} is not divisible by the number of '
        f'processes {process_count}; every process must load the same number of examples. '
        f'Use a multiple of {process_count}.'
      )
    self.steps_per_epoch = steps_per_epoch(name, split, data_dir, global_batch_size)
    self._source = datasets.RecordSource(name, split, data_dir)
    self._identity = {
      'dataset': name,
      'split': split,
      'num_examples': len(self._source),
      'global_batch_size': int(global_batch_size),
      'seed': int(seed),
      'augment': repr(augment_config),
    }
    self._config, self._seed = augment_config, int(seed)
    # The model's normalisation; a workdir's model config (hence these) cannot change on
    # resume (checkpoint.check_workdir), so they are not part of the state's identity.
    self._mean = tuple(float(v) for v in mean)
    self._std = tuple(float(v) for v in std)
    self._global_batch, self._local_batch = global_batch_size, global_batch_size // process_count
    self._process_index, self._worker_count = process_index, worker_count
    self._step = 0
    self._it = None

  def _build(self):
    positions = _Positions(
      len(self._source),
      self._global_batch,
      self._local_batch,
      self._process_index,
      self._seed,
      self._step,
    )
    ds = (
      grain.MapDataset.source(positions)
      .map(_LoadAndAugment(self._source, self._config, self._seed, self._mean, self._std))
      .batch(self._local_batch, drop_remainder=True)
      # One background thread a process (grain's default is 16 threads and 500 queued
      # elements: here an element is a whole batch, gigabytes at crop 473).
      .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    )
    if self._worker_count > 0:
      _compat.grain_flags_usable()
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self._worker_count), worker_init_fn=_worker_init
      )
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._build()
    batch = next(self._it)
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    """Batches consumed so far (= global steps, on every process)."""
    return self._step

  def get_state(self) -> dict:
    """JSON-serialisable; restores on any worker or process count."""
    return {'step': self._step, **self._identity}

  def set_state(self, state: dict) -> None:
    """Continues after the batches counted in `state` (from get_state of a like loader)."""
    mismatched = self._changes_from(state)
    if mismatched:
      raise UserError(
        f'the iterator state belongs to another input pipeline; '
        f'(state, this loader) differ in {mismatched}'
      )
    self.close()
    self._step = int(state['step'])

  def _changes_from(self, state: dict) -> dict:
    """What of this pipeline's identity differs from ``state``'s: {key: (state's, ours)}."""
    return {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}

  def resume(self, state: dict, mode: str = 'auto') -> str | None:
    """Continues from a checkpoint's ``state`` (``config.dataset.resume_data``):

    - ``exact``: the batches that run would have drawn next (``set_state``); refused, in
      one line naming what changed, when the pipeline differs (batch size, seed, split,
      augmentation);
    - ``restart``: the data order of this pipeline from the checkpoint's position in its
      epoch: epoch ``e``, example ``p`` -> this pipeline's first batch at or after
      example ``p`` of epoch ``e`` (users change the batch size between phases);
    - ``auto`` (default): ``exact`` when the pipeline is the same, else ``restart``.

    Returns a line saying what ``restart`` did, None after ``exact``."""
    if mode not in ('auto', 'exact', 'restart'):
      raise UserError(f"config key dataset.resume_data={mode!r}: give 'auto', 'exact' or 'restart'")
    mismatched = self._changes_from(state)
    if mode == 'exact' or (mode == 'auto' and not mismatched):
      if mismatched:
        raise UserError(
          f'the checkpoint was trained with another input pipeline: {_changes(mismatched)}; resume '
          'with the same values, or set --config.dataset.resume_data=restart to keep the model '
          "and optimizer state and continue this pipeline's data order from the checkpoint's "
          'epoch position'
        )
      self.set_state(state)
      return None
    old_steps = max(int(state['num_examples']) // int(state['global_batch_size']), 1)
    epoch, step_in_epoch = divmod(int(state['step']), old_steps)
    position = step_in_epoch * int(state['global_batch_size'])
    batch = min(-(-position // self._global_batch), self.steps_per_epoch)
    self.close()
    self._step = epoch * self.steps_per_epoch + batch
    return (
      f'{_changes(mismatched) or "nothing"} changed since the checkpoint: the model and '
      f'optimizer state resume; the data order starts afresh at epoch {epoch}, example '
      f'{batch * self._global_batch} (the checkpoint was at example {position}; '
      'dataset.resume_data=restart)'
    )

  def close(self) -> None:
    """Stops worker processes (if any); the loader can still be iterated afterwards."""
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def train_loader(
  name: str,
  split: str,
  data_dir: str,
  *,
  global_batch_size: int,
  augment: AugmentConfig,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  mean=MEAN,
  std=STD,
) -> TrainLoader:
  """The training batches of a prepared split for this process (see the module doc).

  mean/std: the model's normalisation (``PSPNetConfig.mean`` / ``.std``), RGB 0-255.

  process_index/process_count default to jax.process_index()/process_count().
  worker_count > 0 decodes and augments in that many grain worker processes.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return TrainLoader(
    name,
    split,
    data_dir,
    global_batch_size=global_batch_size,
    augment_config=augment,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    mean=mean,
    std=std,
  )


def _changes(mismatched: dict) -> str:
  return ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in mismatched.items())
