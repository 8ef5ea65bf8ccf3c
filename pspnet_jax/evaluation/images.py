"""Users' photos as the model reads them: ``[H, W, 3]`` uint8 RGB, the way a viewer shows
them (EXIF orientation applied), whatever the file's mode (RGBA, palette, grayscale, 16-bit).
The predict CLI and the server both read images here, so they segment the same pixels.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pspnet_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


class NotAnImage(UserError):
  """The bytes are no image format PIL knows."""


class ImageTooLarge(UserError):
  """The image holds more pixels than the caller's limit."""


def list_images(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
      raise UserError(f'{path}: no images ({", ".join(IMAGE_EXTENSIONS)}) in this folder')
    return files
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such file or folder')
  return [path]


def read_rgb(
  source: str | os.PathLike | BinaryIO, *, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
  """[H, W, 3] uint8 RGB of an image file (a path or an open binary file; ``name`` names it
  in errors), turned upright by its EXIF orientation as viewers show it. A 16-bit image (PIL
  modes ``I;16*``, and ``I`` as PIL opens 16-bit PNGs) is scaled to 8 bits by its depth
  (``round(v / 257)``, as OpenCV users expect), so it predicts exactly as the same image
  saved in 8 bits; PIL's own conversion would clip it.

  ``max_pixels``: an image of more pixels is refused (``ImageTooLarge``) from its header,
  before it is decoded. Bytes of no known format raise ``NotAnImage``, a damaged file
  ``UserError``."""
  if name is None:
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else 'the image'
  try:
    with Image.open(source) as im:
      w, h = im.size
      if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(
          f'{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels} '
          '(scale the image down, or raise --max-pixels)'
        )
      upright = ImageOps.exif_transpose(im)
      if upright.mode.startswith('I;16') or upright.mode == 'I':
        a = np.asarray(upright, dtype=np.float64)
        if a.min() < 0 or a.max() > 65535:
          raise UserError(
            f'{name}: a {upright.mode} image with values in [{a.min():g}, {a.max():g}]; '
            'only 8- and 16-bit images are read: save it as 8- or 16-bit PNG'
          )
        gray = np.round(a / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
      return np.asarray(upright.convert('RGB'))
  except Image.UnidentifiedImageError:
    raise NotAnImage(
      f'{name}: not an image PIL can read (give a JPEG, PNG, BMP, WebP or TIFF file)'
    ) from None
  except Image.DecompressionBombError as e:
    raise ImageTooLarge(f'{name}: {e} (PIL refuses images this large: scale it down)') from None
  except OSError as e:
    raise UserError(f'{name}: not a readable image ({e})') from None
