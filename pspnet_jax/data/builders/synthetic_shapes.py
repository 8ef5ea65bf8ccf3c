"""synthetic_shapes: coloured circles, squares and triangles on textured backgrounds.

The embedded dataset of the quick start and the tests: no download, prepared in seconds,
and learnable by a small PSPNet in minutes on a CPU. Each class has its own shape and a
saturated hue (jittered), the background is a low-saturation texture, and the whole image
gets pixel noise, so colour gets a model most of the way and shape the rest. Masks are
exact: image and mask are rasterised by the same OpenCV calls without anti-aliasing.
Everything is a function of (seed, split, index).
"""

import cv2
import numpy as np

from pspnet_jax.data.builders import base
from pspnet_jax.errors import UserError

CLASS_NAMES = ('background', 'circle', 'square', 'triangle')
# Mean colours (RGB) of the shapes; background is grey-ish, far from all three.
_SHAPE_RGB = {1: (220, 50, 40), 2: (40, 190, 60), 3: (50, 80, 225)}
PALETTE = ((0, 0, 0), (220, 50, 40), (40, 190, 60), (50, 80, 225))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """-> uint8 [size, size, 3]: smooth blotches plus stripes, low saturation."""
  coarse = rng.uniform(70, 180, (6, 6, 1)).astype(np.float32)
  smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(6, 20)
  stripes = 15 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period)
  tint = rng.uniform(-12, 12, 3).astype(np.float32)  # slight colour cast, stays grey-ish
  return np.clip(smooth + stripes[..., None] + tint, 0, 255).astype(np.uint8)


def _draw_shape(image, mask, cls, rng, size):
  """Draws one shape of class cls in place on image [S,S,3] and mask [S,S]."""
  colour = np.clip(np.array(_SHAPE_RGB[cls]) + rng.integers(-25, 26, 3), 0, 255)
  colour = tuple(int(c) for c in colour)
  r = int(rng.uniform(0.12, 0.25) * size)  # >= 1.5 feature cells at output stride 8
  cx, cy = (int(v) for v in rng.integers(r // 2, size - r // 2, 2))
  if cls == 1:
    cv2.circle(image, (cx, cy), r, colour, -1)
    cv2.circle(mask, (cx, cy), r, cls, -1)
    return
  if cls == 2:
    theta = rng.uniform(0, np.pi / 2)
    corners = [theta + k * np.pi / 2 for k in range(4)]
  else:
    theta = rng.uniform(0, 2 * np.pi)
    corners = [theta + k * 2 * np.pi / 3 for k in range(3)]
  pts = np.array([[cx + r * np.cos(a), cy + r * np.sin(a)] for a in corners], np.int32)
  cv2.fillPoly(image, [pts], colour)
  cv2.fillPoly(mask, [pts], cls)


def make_example(seed: int, split_index: int, index: int, size: int):
  """-> (image uint8 [size, size, 3] RGB, label uint8 [size, size]); pure in its inputs."""
  rng = np.random.default_rng([seed, split_index, index])
  image = _background(rng, size)
  mask = np.zeros((size, size), np.uint8)
  for _ in range(int(rng.integers(1, 5))):
    _draw_shape(image, mask, int(rng.integers(1, len(CLASS_NAMES))), rng, size)
  noise = rng.normal(0, 8, image.shape)
  image = np.clip(image + noise, 0, 255).astype(np.uint8)
  return image, mask


class SyntheticShapes(base.SegmentationBuilder):
  """Procedural shapes; builder kwargs: image_size, num_train, num_val, seed."""

  DESCRIPTION = __doc__
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE

  def __init__(
    self, *, image_size: int = 96, num_train: int = 512, num_val: int = 64, seed: int = 0, **kwargs
  ):
    if image_size < 16 or num_train < 1 or num_val < 1:
      raise UserError(
        'synthetic_shapes needs image_size >= 16 and at least one example '
        f'per split, got {image_size=}, {num_train=}, {num_val=}'
      )
    self.image_size, self.num_train, self.num_val, self.seed = image_size, num_train, num_val, seed
    super().__init__(**kwargs)

  def base_size(self) -> int:
    return self.image_size

  def extra_metadata(self) -> dict:
    return {
      'builder_kwargs': {
        'image_size': self.image_size,
        'num_train': self.num_train,
        'num_val': self.num_val,
        'seed': self.seed,
      }
    }

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return self.generate_splits(
      {
        split: self._raws(split_index, n)
        for split_index, (split, n) in enumerate([('train', self.num_train), ('val', self.num_val)])
      }
    )

  def _raws(self, split_index: int, n: int):
    for i in range(n):
      image, label = make_example(self.seed, split_index, i, self.image_size)
      yield base.RawExample(
        key=f'{i:06d}',
        id=f'shapes_{split_index}_{i:06d}',
        image_name=f'synthetic #{i}',
        label_name=f'synthetic #{i}',
        read_image=lambda im=image: base.encode_png(im),
        read_label=lambda lb=label: lb,
      )
