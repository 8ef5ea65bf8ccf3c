"""Class colours: the Pascal VOC colour map (the default palette of every dataset without
its own) and the check that turns a stored palette into a ``[C, 3]`` uint8 table."""

from __future__ import annotations

import numpy as np

from pspnet_jax.errors import UserError


def default_palette(num_classes: int) -> np.ndarray:
  """The Pascal VOC colour map: [num_classes, 3] uint8; class 0 is black.

  The bits of the class index are dealt out to R, G, B (bit 0 -> R, 1 -> G, 2 -> B, then
  the next three bits one step lower in each channel), which keeps neighbouring ids apart.
  """
  ids = np.arange(num_classes, dtype=np.int64)
  rgb = np.zeros((num_classes, 3), np.int64)
  for level in range(8):
    for channel in range(3):
      bit = (ids >> (3 * level + channel)) & 1
      rgb[:, channel] |= bit << (7 - level)
  return rgb.astype(np.uint8)


def as_palette(palette, num_classes: int) -> np.ndarray:
  """A palette (sequence of RGB triples, or None for the default) as [num_classes, 3] uint8."""
  if palette is None:
    return default_palette(num_classes)
  arr = np.asarray(palette)
  if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < num_classes:
    raise UserError(f'palette must be [>= {num_classes}, 3] RGB, got shape {arr.shape}')
  if arr.min() < 0 or arr.max() > 255:
    raise UserError('palette values must be in 0..255')
  return arr[:num_classes].astype(np.uint8)
