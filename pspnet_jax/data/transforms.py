"""semseg's training augmentation, as small functions on NumPy arrays (OpenCV does the work).

Order and parameters follow semseg's util/transform.py and tool/train.py: random scale
[0.5, 2.0] (image bilinear, label nearest), random rotate p=0.5 in [-10, 10] degrees (image
border = mean, label border = 255), Gaussian blur 5x5 p=0.5, horizontal flip p=0.5, random
crop with centred padding (image mean, label 255), normalise. As in semseg the image is
float32 on the 0-255 scale from decoding on, so the padding is the mean exactly and becomes
exactly 0 after normalisation. The mean and std are the model's (``PSPNetConfig.mean`` /
``.std``; semseg's ImageNet values by default).

Images are RGB [H, W, 3] float32 (0-255), labels uint8 [H, W]. Each function takes a
``np.random.Generator``; ``example_rng`` derives one per example from (seed, epoch, position),
which makes every example's augmentation independent of worker and process counts.
"""

import dataclasses

import cv2
import numpy as np

from pspnet_jax.normalize import MEAN, STD, normalize


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation; the defaults are semseg's (ADE20K / VOC crop 473)."""

  crop_size: int = 473
  scale_min: float = 0.5
  scale_max: float = 2.0
  rotate_min: float = -10
  rotate_max: float = 10
  blur: bool = True
  flip: bool = True
  ignore_label: int = 255


def _rgb(mean) -> tuple[float, float, float]:
  return tuple(float(v) for v in mean)


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator for the example at `position` of `epoch` (independent streams)."""
  return np.random.default_rng([seed, epoch, position])


def random_scale(image, label, rng, scale_min: float, scale_max: float):
  """Resizes both by one factor in [scale_min, scale_max] (cv2 rounds the new size)."""
  s = scale_min + (scale_max - scale_min) * rng.random()
  image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
  return image, label


def random_rotate(
  image,
  label,
  rng,
  angle_min: float,
  angle_max: float,
  ignore_label: int = 255,
  p: float = 0.5,
  mean=MEAN,
):
  """With probability p rotates about the centre, keeping the size; uncovered corners are
  the mean in the image and ignore_label in the label."""
  if rng.random() >= p:
    return image, label
  angle = angle_min + (angle_max - angle_min) * rng.random()
  h, w = label.shape
  matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
  image = cv2.warpAffine(
    image,
    matrix,
    (w, h),
    flags=cv2.INTER_LINEAR,
    borderMode=cv2.BORDER_CONSTANT,
    borderValue=_rgb(mean),
  )
  label = cv2.warpAffine(
    label,
    matrix,
    (w, h),
    flags=cv2.INTER_NEAREST,
    borderMode=cv2.BORDER_CONSTANT,
    borderValue=ignore_label,
  )
  return image, label


def random_gaussian_blur(image, rng, ksize: int = 5, p: float = 0.5):
  """With probability p, a ksize x ksize Gaussian blur (sigma from the size, as cv2's 0)."""
  if rng.random() >= p:
    return image
  return cv2.GaussianBlur(image, (ksize, ksize), 0)


def random_hflip(image, label, rng, p: float = 0.5):
  if rng.random() >= p:
    return image, label
  return cv2.flip(image, 1), cv2.flip(label, 1)


def random_crop(image, label, rng, crop_size: int, ignore_label: int = 255, mean=MEAN):
  """Pads to at least crop_size (centred: the odd pixel goes bottom/right), then crops a
  uniformly placed crop_size x crop_size window."""
  h, w = label.shape
  pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
  if pad_h or pad_w:
    top, left = pad_h // 2, pad_w // 2
    border = (top, pad_h - top, left, pad_w - left)
    image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=_rgb(mean))
    label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=ignore_label)
    h, w = label.shape
  y = int(rng.integers(0, h - crop_size + 1))
  x = int(rng.integers(0, w - crop_size + 1))
  return image[y : y + crop_size, x : x + crop_size], label[y : y + crop_size, x : x + crop_size]


def augment(image, label, rng: np.random.Generator, config: AugmentConfig, mean=MEAN, std=STD):
  """image: uint8/float [H, W, 3] RGB 0-255, label: uint8 [H, W] ->
  (float32 [crop, crop, 3] normalised with ``mean`` / ``std``, int32 [crop, crop])."""
  image = np.asarray(image, np.float32)
  label = np.ascontiguousarray(label, np.uint8)
  image, label = random_scale(image, label, rng, config.scale_min, config.scale_max)
  image, label = random_rotate(
    image, label, rng, config.rotate_min, config.rotate_max, config.ignore_label, mean=mean
  )
  if config.blur:
    image = random_gaussian_blur(image, rng)
  if config.flip:
    image, label = random_hflip(image, label, rng)
  image, label = random_crop(image, label, rng, config.crop_size, config.ignore_label, mean=mean)
  # The crop is a strided view into the larger image; normalising a contiguous copy is
  # about twice as fast (the three passes of normalize() then stream through memory).
  return normalize(np.ascontiguousarray(image), mean, std), label.astype(np.int32)
