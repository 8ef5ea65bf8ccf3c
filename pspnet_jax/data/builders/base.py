"""What every segmentation builder shares: features, metadata, validation of raw examples.

A prepared dataset is TFDS array_record files whose examples are
``{'image': encoded RGB bytes, 'label': PNG bytes of a uint8 [H, W] class map, 'id': str}``
with labels already in training form (0..C-1, 255 ignored), plus ``metadata.json`` holding
class names, palette, ignore label and evaluation base size.

TensorFlow is never needed: TFDS's ``Image`` feature encodes NumPy arrays with
``tf.image.encode_png``, so builders hand it bytes they encoded themselves (or the original
file bytes) and TFDS stores them as they are; reading decodes with OpenCV.
"""

import dataclasses
import io
import logging
import os
from collections.abc import Callable, Iterable

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image as PILImage

from pspnet_jax.errors import UserError
from pspnet_jax.palette import default_palette

IGNORE_LABEL = 255
VERSION = '1.0.0'


class BadExampleError(UserError):
  """One raw example cannot be used; the message names the file and what to do."""


class ManualDirError(UserError, FileNotFoundError):
  """The raw files a builder needs are not where it looked."""


def bitwise_palette(n: int) -> tuple[tuple[int, int, int], ...]:
  """The Pascal VOC colour map (bits of the class index spread over R, G, B)."""
  return tuple(tuple(int(v) for v in rgb) for rgb in default_palette(n))


def read_file(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def encode_png(array: np.ndarray) -> bytes:
  """array: uint8 [H, W] (label) or [H, W, 3] RGB -> PNG bytes."""
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
  ok, buf = cv2.imencode('.png', np.ascontiguousarray(array))
  if not ok:
    raise RuntimeError('OpenCV could not encode a PNG')
  return buf.tobytes()


def decode_rgb(data: bytes, where: str) -> tuple[bytes, tuple[int, int]]:
  """Checks raw image bytes; returns bytes TFDS can store as RGB and the (H, W).

  The original bytes are kept (no re-compression) when they are a 3-channel 8-bit image;
  grey, RGBA or 16-bit images are converted to 8-bit RGB PNG, because TFDS decodes with
  ``IMREAD_UNCHANGED`` and would hand back the wrong number of channels.
  """
  array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if array is None:
    raise BadExampleError(
      f'{where}: cannot decode the image (corrupt or not an image file). Replace the '
      'file, remove the example, or prepare with --skip-bad-examples to drop it.'
    )
  if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
    return data, array.shape[:2]
  if array.dtype != np.uint8:
    array = (array // 257).astype(np.uint8) if array.dtype == np.uint16 else array.astype(np.uint8)
  if array.ndim == 2:
    rgb = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
  elif array.shape[2] == 4:
    rgb = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
  else:
    rgb = cv2.cvtColor(array[..., :3], cv2.COLOR_BGR2RGB)
  return encode_png(rgb), rgb.shape[:2]


def decode_label(data: bytes, where: str) -> np.ndarray:
  """Label image bytes -> uint8 [H, W] class indices.

  Read with PIL, not OpenCV: palette PNGs (Pascal VOC) store class indices that OpenCV
  would turn into colours.
  """
  try:
    with PILImage.open(io.BytesIO(data)) as im:
      mode = im.mode
      array = np.asarray(im)
  except Exception as e:  # PIL raises many types for corrupt files
    raise BadExampleError(
      f'{where}: cannot decode the label image ({e}). Replace the file, remove the '
      'example, or prepare with --skip-bad-examples to drop it.'
    ) from e
  if array.ndim != 2:
    raise BadExampleError(
      f'{where}: the label image has mode {mode} with {array.shape[-1]} channels; labels '
      'must be single-channel class indices (grey or palette PNG), not a colour '
      'rendering of the classes. Convert it, or drop it with --skip-bad-examples.'
    )
  if array.dtype != np.uint8:
    if array.size and (array.min() < 0 or array.max() > 255):
      raise BadExampleError(
        f'{where}: label values span {array.min()}..{array.max()}, beyond 8 bits; class '
        'indices must be 0..254 with 255 for ignored pixels.'
      )
    array = array.astype(np.uint8)
  return array


def _read(read: Callable, name: str, what: str):
  try:
    return read()
  except (OSError, KeyError) as e:  # KeyError: a member missing from a zip archive
    raise BadExampleError(
      f'{name}: cannot read the {what} ({e}). Restore the file or remove the example, or '
      'prepare with --skip-bad-examples to drop it.'
    ) from e


@dataclasses.dataclass(frozen=True)
class RawExample:
  """Where one raw example's bytes come from (read lazily, during preparation)."""

  key: str  # unique within the split
  id: str  # kept in the dataset, e.g. to name predictions
  image_name: str  # for error messages
  label_name: str
  read_image: Callable[[], bytes]
  read_label: Callable[[], bytes | np.ndarray]  # bytes of a label image, or the array


def label_lookup(mapping: dict[int, int], valid: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
  """-> (lut uint8 [256]: raw value -> training label, valid bool [256]); unmapped -> 255."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for raw, train in mapping.items():
    lut[raw] = train
  ok = np.zeros(256, bool)
  ok[list(valid)] = True
  return lut, ok


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of this project's builders. Subclasses set the class attributes below and
  implement ``_split_generators`` returning ``self.generate_splits({split: raws})``.

  Raw label values are checked against ``valid`` and mapped through ``lut`` (both [256]).
  """

  VERSION = tfds.core.Version(VERSION)
  CLASS_NAMES: tuple[str, ...] = ()
  PALETTE: tuple[tuple[int, int, int], ...] = ()
  BASE_SIZE: int = 512
  DESCRIPTION = ''
  VALID_RAW_HINT = ''  # says what raw label values are allowed, for errors

  def __init__(self, *, skip_bad_examples: bool = False, manual_dir: str | None = None, **kwargs):
    self.skip_bad_examples = skip_bad_examples
    self.manual_dir = os.fspath(manual_dir) if manual_dir else None
    self.skipped: list[str] = []  # messages of dropped examples
    super().__init__(**kwargs)

  def require_manual_dir(self, *, needs: str, instructions: str) -> str:
    """-> the manual dir; ManualDirError saying what to download and where, if unset."""
    if not self.manual_dir or not os.path.isdir(self.manual_dir):
      where = f'{self.manual_dir} does not exist' if self.manual_dir else 'no --manual-dir given'
      raise ManualDirError(f'{self.name} needs {needs} in --manual-dir ({where}). {instructions}')
    return self.manual_dir

  def extra_metadata(self) -> dict:
    """Builder-specific metadata (JSON-serialisable); recorded for idempotent prepare."""
    return {}

  def class_names(self) -> tuple[str, ...]:
    return self.CLASS_NAMES

  def palette(self) -> tuple[tuple[int, int, int], ...]:
    return self.PALETTE or bitwise_palette(len(self.class_names()))

  def base_size(self) -> int:
    return self.BASE_SIZE

  def label_map(self) -> tuple[np.ndarray, np.ndarray]:
    """-> (lut, valid); default: identity on 0..C-1 and 255."""
    c = len(self.class_names())
    return label_lookup({i: i for i in range(c)}, [*range(c), IGNORE_LABEL])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          # Bytes are stored as given (JPEG or PNG); decoding is format-agnostic.
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format=None),
          'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
          'id': tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(
        class_names=list(self.class_names()),
        palette=[list(c) for c in self.palette()],
        ignore_label=IGNORE_LABEL,
        base_size=self.base_size(),
        skipped_examples=0,
        **self.extra_metadata(),
      ),
    )

  def generate_splits(self, split_raws: dict[str, Iterable[RawExample]]) -> dict:
    """{split: raw examples} -> what ``_split_generators`` returns."""
    return {split: self._generate_examples(raws, split) for split, raws in split_raws.items()}

  def _generate_examples(self, raws: Iterable[RawExample], split: str):
    lut, valid = self.label_map()
    count = 0
    for raw in raws:
      try:
        example = self._encode(raw, lut, valid)
      except BadExampleError as e:
        if not self.skip_bad_examples:
          raise
        logging.warning('skipping a bad example: %s', e)
        self.skipped.append(str(e))
        # TFDS writes metadata after all splits are generated, so the count lands in it.
        self.info.metadata['skipped_examples'] = len(self.skipped)
        continue
      count += 1
      yield raw.key, example
    if not count:  # TFDS would only say "No examples were yielded"
      raise BadExampleError(
        f'{self.name}: split {split!r} has no usable examples ({len(self.skipped)} bad ones '
        'skipped so far). Check the raw files, and the layout in docs/datasets.md.'
      )

  def _encode(self, raw: RawExample, lut: np.ndarray, valid: np.ndarray) -> dict:
    image_bytes, image_hw = decode_rgb(
      _read(raw.read_image, raw.image_name, 'image'), raw.image_name
    )
    label = _read(raw.read_label, raw.label_name, 'label')
    if isinstance(label, bytes):
      label = decode_label(label, raw.label_name)
    if label.shape != image_hw:
      raise BadExampleError(
        f'{raw.label_name}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from '
        f'its image {raw.image_name} ({image_hw[1]}x{image_hw[0]}). Pair the right files, '
        'or drop the example with --skip-bad-examples.'
      )
    present = np.unique(label)
    bad = present[~valid[present]]
    if bad.size:
      raise BadExampleError(
        f'{raw.label_name}: label values {bad.tolist()[:10]} are not allowed '
        f'({self.VALID_RAW_HINT or self._default_hint()}). Fix the label map or the class '
        'file, or drop the example with --skip-bad-examples.'
      )
    return {'image': image_bytes, 'label': encode_png(lut[label]), 'id': raw.id}

  def _default_hint(self) -> str:
    return f'classes are 0..{len(self.class_names()) - 1}, 255 marks ignored pixels'
