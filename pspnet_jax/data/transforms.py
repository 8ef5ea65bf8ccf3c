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
  rotate_min: float = -10.0
  rotate_max: float = 10.0
  blur: bool = True
  flip: bool = True
  ignore_label: int = 255
  # mmsegmentation's pipeline (semseg has none of these): the scale range relative to a
  # base (long, short) scale (``random_rescale``; empty: relative to the image), the crop's
  # class-balance rule (``random_crop``; 1: off), PhotoMetricDistortion.
  scale_base: tuple[int, ...] = ()
  cat_max_ratio: float = 1.0
  photometric: bool = False
  brightness_delta: float = 32.0
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18


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


def random_rescale(
  image, label, rng, scale_base: tuple[int, int], ratio_min: float, ratio_max: float
):
  """mmseg's RandomResize with ``keep_ratio``: the base scale (long, short), e.g. (2048,
  512), times one ratio in [ratio_min, ratio_max] (each side truncated to an int), then the
  image scaled by the largest factor that fits its long side and its short side within it
  (new sides rounded half up, as mmcv's rescale_size); image bilinear, label nearest."""
  ratio = ratio_min + (ratio_max - ratio_min) * rng.random()
  long_side, short_side = (int(s * ratio) for s in scale_base)
  long_side, short_side = max(long_side, short_side), min(long_side, short_side)
  h, w = label.shape
  factor = min(long_side / max(h, w), short_side / min(h, w))
  size = (int(w * factor + 0.5), int(h * factor + 0.5))
  image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
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


def random_crop(
  image,
  label,
  rng,
  crop_size: int,
  ignore_label: int = 255,
  mean=MEAN,
  distort=None,
  cat_max_ratio: float = 1.0,
):
  """Pads to at least crop_size (centred: the odd pixel goes bottom/right), then crops a
  uniformly placed crop_size x crop_size window.

  ``cat_max_ratio`` < 1 is mmseg's RandomCrop rule: while one class holds that share or more
  of the window's labelled pixels (or it has a single class), the window is drawn again, up
  to 10 times; the last one drawn is kept. ``distort`` (image -> image) transforms the
  image's part of the window before the padding is added (mmseg distorts colours before it
  pads: the padding stays the exact mean). The window is cut from the unpadded image and
  padded afterwards, which is the same as padding first."""
  h, w = label.shape
  pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
  top, left = pad_h // 2, pad_w // 2

  def draw():  # the window's corner in the image's coordinates (negative: in the padding)
    y = int(rng.integers(0, h + pad_h - crop_size + 1)) - top
    return y, int(rng.integers(0, w + pad_w - crop_size + 1)) - left

  def cut(array, y, x, value, transform=None):
    y0, y1, x0, x1 = max(y, 0), min(y + crop_size, h), max(x, 0), min(x + crop_size, w)
    part = array[y0:y1, x0:x1]
    if transform is not None:
      part = transform(part)
    border = (y0 - y, y + crop_size - y1, x0 - x, x + crop_size - x1)
    if any(border):
      part = cv2.copyMakeBorder(part, *border, cv2.BORDER_CONSTANT, value=value)
    return part

  y, x = draw()
  if cat_max_ratio < 1:
    for _ in range(10):
      classes, counts = np.unique(cut(label, y, x, ignore_label), return_counts=True)
      counts = counts[classes != ignore_label]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = draw()
  return cut(image, y, x, _rgb(mean), distort), cut(label, y, x, ignore_label)


def photometric_distortion(
  image,
  rng: np.random.Generator,
  *,
  brightness_delta: float = 32,
  contrast_range: tuple[float, float] = (0.5, 1.5),
  saturation_range: tuple[float, float] = (0.5, 1.5),
  hue_delta: int = 18,
) -> np.ndarray:
  """mmsegmentation 1.x's ``PhotoMetricDistortion`` (mmseg/datasets/transforms/
  transforms.py, open-mmlab/mmsegmentation v1.2.2), on uint8 RGB [H, W, 3] -> uint8 RGB.

  Each step happens with probability 1/2, and each works on uint8 as mmseg's does (float32
  arithmetic, clipped to [0, 255], truncated back to uint8): brightness ``+ U(-delta,
  delta)``; contrast ``x U(contrast_range)`` either second or last (a coin flip before it);
  saturation ``S x U(saturation_range)`` and hue ``(H + randint(-hue_delta, hue_delta)) mod
  180`` in OpenCV's 8-bit HSV (H in 0..179), each a round trip through it. The draws come
  from ``rng`` in mmseg's order (a coin, then the value it gates); ``randint``'s upper bound
  is exclusive, as numpy's is in mmseg."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(
      f'photometric_distortion wants uint8 [H, W, 3], got {image.dtype} {image.shape}'
    )

  def scaled(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(
      np.uint8
    )

  def contrast(x):
    return scaled(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

  if rng.integers(2):
    image = scaled(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_second = rng.integers(2) == 1
  if contrast_second:
    image = contrast(image)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = scaled(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = rng.integers(-hue_delta, hue_delta) if hue_delta else 0  # 0: mmseg's randint fails
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_second:
    image = contrast(image)
  return image


def augment(image, label, rng: np.random.Generator, config: AugmentConfig, mean=MEAN, std=STD):
  """image: uint8/float [H, W, 3] RGB 0-255, label: uint8 [H, W] ->
  (float32 [crop, crop, 3] normalised with ``mean`` / ``std``, int32 [crop, crop])."""
  image = np.asarray(image, np.float32)
  label = np.ascontiguousarray(label, np.uint8)
  if config.scale_base:  # mmseg: relative to a base scale
    image, label = random_rescale(
      image, label, rng, tuple(config.scale_base), config.scale_min, config.scale_max
    )
  else:  # semseg: relative to the image
    image, label = random_scale(image, label, rng, config.scale_min, config.scale_max)
  image, label = random_rotate(
    image, label, rng, config.rotate_min, config.rotate_max, config.ignore_label, mean=mean
  )
  if config.blur:
    image = random_gaussian_blur(image, rng)
  if config.flip:
    image, label = random_hflip(image, label, rng)
  distort = None
  if config.photometric:
    # After the crop and flip and before the padding, on uint8, as mmseg's pipeline.
    def distort(part):
      return photometric_distortion(
        np.clip(np.rint(part), 0, 255).astype(np.uint8),
        rng,
        brightness_delta=config.brightness_delta,
        contrast_range=tuple(config.contrast_range),
        saturation_range=tuple(config.saturation_range),
        hue_delta=int(config.hue_delta),
      ).astype(np.float32)

  image, label = random_crop(
    image,
    label,
    rng,
    config.crop_size,
    config.ignore_label,
    mean=mean,
    distort=distort,
    cat_max_ratio=config.cat_max_ratio,
  )
  # The crop is a strided view into the larger image; normalising a contiguous copy is
  # about twice as fast (the three passes of normalize() then stream through memory).
  return normalize(np.ascontiguousarray(image), mean, std), label.astype(np.int32)
