"""Predictions as pictures: label PNGs, colourised PNGs and image/prediction overlays.

Label PNGs hold one uint8 class id per pixel. Models predict *training* ids (0..C-1); a
benchmark server may want the dataset's own ids instead (Cityscapes wants labelIds, not
trainIds), so ``write_prediction`` takes a lookup table ``id_map`` (``id_map[train_id]`` =
the id written), e.g. a dataset's ``train_id_to_label_id`` metadata.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5  # weight of the colourised prediction over the image


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
    raise ValueError(f'palette must be [>= {num_classes}, 3] RGB, got shape {arr.shape}')
  if arr.min() < 0 or arr.max() > 255:
    raise ValueError('palette values must be in 0..255')
  return arr[:num_classes].astype(np.uint8)


def colorize(pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """pred: [H, W] class ids -> [H, W, 3] uint8 RGB."""
  return palette[np.asarray(pred)]


def overlay(image: np.ndarray, pred: np.ndarray, palette: np.ndarray,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """image: [H, W, 3] uint8, pred: [H, W] -> [H, W, 3] uint8 blend of image and colours."""
  blend = (1 - alpha) * np.asarray(image, np.float32) + alpha * colorize(pred, palette).astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def map_ids(pred: np.ndarray, id_map: Sequence[int] | None) -> np.ndarray:
  """Training ids -> the ids to write (``id_map[train_id]``), as uint8."""
  if id_map is None:
    return np.asarray(pred).astype(np.uint8)
  table = np.asarray(id_map, np.int64)
  if table.min() < 0 or table.max() > 255:
    raise ValueError('id_map values must fit a uint8 PNG (0..255)')
  if np.asarray(pred).max(initial=0) >= len(table):
    raise ValueError(f'prediction holds class {int(np.max(pred))} but id_map has {len(table)} entries')
  return table[np.asarray(pred)].astype(np.uint8)


def write_prediction(out_dir: str, stem: str, pred: np.ndarray, *, palette: np.ndarray,
                     image: np.ndarray | None = None, id_map: Sequence[int] | None = None,
                     color: bool = True) -> list[str]:
  """Writes ``<stem>.png`` (ids, uint8), ``<stem>_color.png`` and, given the image,
  ``<stem>_overlay.jpg``. Returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, stem)
  paths = [base + '.png']
  Image.fromarray(map_ids(pred, id_map), mode='L').save(paths[0])
  if color:
    paths.append(base + '_color.png')
    Image.fromarray(colorize(pred, palette), mode='RGB').save(paths[-1])
  if image is not None:
    paths.append(base + '_overlay.jpg')
    Image.fromarray(overlay(image, pred, palette), mode='RGB').save(paths[-1], quality=90)
  return paths
