"""Preparing datasets and reading prepared ones: the names, metadata and evaluation view.

``prepare`` runs a builder from ``builders`` once; everything else reads what it wrote,
with ``tfds.builder_from_directory`` (no builder code, no TensorFlow), so a prepared
dataset can be read on a machine that never saw the raw files.
"""

import dataclasses
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image as PILImage

from pspnet_jax import output_dir
from pspnet_jax.data import builders as builders_lib
from pspnet_jax.errors import UserError


class NotPreparedError(UserError, FileNotFoundError):
  """The dataset has not been prepared in that data dir; the message gives the command."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What training and evaluation need to know about a prepared dataset."""

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  ignore_label: int  # 255
  base_size: int  # evaluation long side (ADE/VOC 512, Cityscapes 2048)
  splits: dict[str, int]  # split name -> number of examples
  metadata: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def _builder_class(name: str):
  try:
    return builders_lib.BUILDERS[name]
  except KeyError:
    raise UserError(f'unknown dataset {name!r}; known: {sorted(builders_lib.BUILDERS)}') from None


def _prepared_dir(name: str, data_dir: str) -> str | None:
  path = os.path.join(os.fspath(data_dir), name, builders_lib.base.VERSION)
  return path if os.path.isfile(os.path.join(path, 'dataset_info.json')) else None


def _prepare_command(name: str, data_dir: str) -> str:
  return f'python -m pspnet_jax.data.prepare {name} --data-dir {data_dir}'


def prepare(
  name: str,
  data_dir: str,
  manual_dir: str | None = None,
  *,
  skip_bad_examples: bool = False,
  **builder_kwargs,
) -> DatasetInfo:
  """Prepares dataset `name` under data_dir/name/1.0.0 (array_record); idempotent.

  manual_dir holds raw files a builder cannot download (docs/datasets.md). builder_kwargs go to
  the builder (e.g. synthetic_shapes' image_size/num_train/num_val/seed, or
  segmentation_folder's root). With skip_bad_examples, unusable raw examples are dropped,
  counted, logged and recorded in the metadata instead of failing the preparation. TFDS
  writes into a temporary directory renamed only on success, so a failed run leaves
  nothing that looks prepared.
  """
  cls = _builder_class(name)
  if _prepared_dir(name, data_dir):
    info = dataset_info(name, data_dir)
    recorded = info.metadata.get('builder_kwargs')
    if recorded is not None and builder_kwargs:
      wanted = cls(data_dir=data_dir, **builder_kwargs).extra_metadata().get('builder_kwargs')
      if wanted != recorded:
        differ = ', '.join(
          f'{k}={recorded.get(k)!r} (prepared) vs {wanted.get(k)!r} (asked)'
          for k in sorted(set(recorded) | set(wanted))
          if recorded.get(k) != wanted.get(k)
        )
        raise UserError(
          f'{name} in {data_dir} was prepared with other options: {differ} (use another '
          f'--data-dir, or delete {_prepared_dir(name, data_dir)} to prepare it again)'
        )
    return info
  tfds.disable_progress_bar()
  output_dir.check_writable(os.path.abspath(data_dir), '--data-dir')
  builder = cls(
    data_dir=os.fspath(data_dir),
    file_format='array_record',
    skip_bad_examples=skip_bad_examples,
    manual_dir=manual_dir,
    **builder_kwargs,
  )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except OSError as e:
    # Several processes (hosts on a shared file system) may prepare at once: each writes
    # its own temporary directory and the renames after the first one fail.
    if _prepared_dir(name, data_dir):
      logging.info('%s: another process finished preparing it first', name)
    elif type(e).__module__.split('.')[0] in ('requests', 'urllib3') or isinstance(
      e, ConnectionError
    ):
      raise UserError(
        f'{name}: downloading its raw files failed ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:200]}); download them where you can and give '
        'their folder as --manual-dir / dataset.manual_dir (docs/datasets.md)'
      ) from e
    else:
      raise
  if builder.skipped:
    logging.warning(
      '%s: skipped %d bad example(s), first: %s', name, len(builder.skipped), builder.skipped[0]
    )
  return dataset_info(name, data_dir)


def _read_builder(name: str, data_dir: str):
  _builder_class(name)  # an unknown name is not one to prepare
  path = _prepared_dir(name, data_dir)
  if path is None:
    raise NotPreparedError(
      f'dataset {name!r} is not prepared in {data_dir} (no {name}/'
      f'{builders_lib.base.VERSION}/dataset_info.json there). Prepare it with: '
      f'{_prepare_command(name, data_dir)} [--manual-dir DIR]  (see docs/datasets.md)'
    )
  return tfds.builder_from_directory(path)


def dataset_info(name: str, data_dir: str) -> DatasetInfo:
  """Metadata of a prepared dataset; FileNotFoundError naming the command if unprepared."""
  info = _read_builder(name, data_dir).info
  meta = dict(info.metadata)
  return DatasetInfo(
    name=name,
    num_classes=len(meta['class_names']),
    class_names=tuple(meta['class_names']),
    palette=tuple(tuple(int(v) for v in c) for c in meta['palette']),
    ignore_label=int(meta['ignore_label']),
    base_size=int(meta['base_size']),
    splits={k: int(v.num_examples) for k, v in info.splits.items()},
    metadata=meta,
  )


class RecordSource:
  """Random access to one split's decoded examples; picklable (reopens in workers).

  item i -> {'image': uint8 [H, W, 3] RGB, 'label': uint8 [H, W], 'id': str}, original size.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    self.name, self.split, self.data_dir = name, split, os.fspath(data_dir)
    self._source = self._encoded = None
    splits = dataset_info(name, data_dir).splits
    if split not in splits:
      raise UserError(f'{name} has no split {split!r}; it has {sorted(splits)}')
    self._len = splits[split]

  def _open(self):
    if self._source is None:
      self._source = _read_builder(self.name, self.data_dir).as_data_source(split=self.split)
    return self._source

  def __len__(self) -> int:
    return self._len

  def image_size(self, i: int) -> tuple[int, int]:
    """(H, W) of image ``i``, read from its encoded header without decoding it."""
    if self._encoded is None:
      self._encoded = _read_builder(self.name, self.data_dir).as_data_source(
        split=self.split,
        decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()},
      )
    with PILImage.open(io.BytesIO(self._encoded[int(i)]['image'])) as im:
      w, h = im.size
    return h, w

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._len:
      raise IndexError(f'index {i} out of range for {self.name}/{self.split} ({self._len})')
    ex = self._open()[int(i)]
    ident = ex['id']
    return {
      'image': ex['image'],
      'label': np.asarray(ex['label'])[..., 0],
      'id': ident.decode() if isinstance(ident, bytes) else str(ident),
    }

  def __getstate__(self):
    return {**self.__dict__, '_source': None, '_encoded': None}

  def __repr__(self):
    return f'RecordSource({self.name!r}, {self.split!r}, {self.data_dir!r}, len={self._len})'


def eval_source(name: str, split: str, data_dir: str) -> RecordSource:
  """Random-access view of a prepared split for evaluation (images at original size)."""
  return RecordSource(name, split, data_dir)
