"""mmsegmentation's training pipeline in ``pspnet_jax.data.transforms`` (PhotoMetricDistortion,
RandomResize of a base scale, RandomCrop's cat_max_ratio) against references written here
from mmseg 1.x's and mmcv's descriptions (mmseg/datasets/transforms/transforms.py, v1.2.2;
mmcv's RandomResize / rescale_size): they work on BGR uint8 images as mmseg's pipeline holds
them, draw from numpy's global-style API in mmseg's order, and convert with OpenCV's
BGR<->HSV (what mmcv.bgr2hsv / hsv2bgr call)."""

import itertools

import cv2
import numpy as np
import pytest

from pspnet_jax.data import transforms


def _convert(img, alpha=1.0, beta=0.0):  # mmseg's convert: float32, clip, truncate to uint8
  img = img.astype(np.float32) * alpha + beta
  return np.clip(img, 0, 255).astype(np.uint8)


def reference(bgr, random, delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta=18):
  """mmseg's transform(): ``random`` offers randint(n) / randint(a, b) / uniform(a, b)."""

  def do_contrast(img):
    if random.randint(2):
      return _convert(img, alpha=random.uniform(*contrast))
    return img

  img = bgr
  if random.randint(2):
    img = _convert(img, beta=random.uniform(-delta, delta))
  mode = random.randint(2)
  if mode == 1:
    img = do_contrast(img)
  if random.randint(2):
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 1] = _convert(img[:, :, 1], alpha=random.uniform(*saturation))
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if random.randint(2):
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if mode == 0:
    img = do_contrast(img)
  return img


class Scripted:
  """Hands out given draws, as numpy's RandomState (reference) or Generator (ours) would."""

  def __init__(self, draws):
    self.draws = list(draws)

  def _next(self, kind):
    got_kind, value = self.draws.pop(0)
    assert got_kind == kind, (got_kind, kind)
    return value

  def randint(self, *args):  # RandomState-style, for the reference
    return self._next('int')

  integers = randint  # Generator-style, for pspnet_jax

  def random(self):  # RandomState.random_sample / Generator.random
    return self._next('unit')

  random_sample = random

  def uniform(self, low, high):
    value = self._next('float')
    assert low <= value <= high
    return value


def _image(seed=0, size=(23, 31)):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  img[:4] = 255  # saturated and dark corners: clipping is exercised
  img[-4:] = 0
  return img


@pytest.mark.parametrize('coins', list(itertools.product([0, 1], repeat=5)))
def test_every_branch_with_fixed_draws_equals_the_reference(coins):
  """All 32 combinations of the four coins and the contrast position, with draws near the
  ends of their ranges (hue -18 wraps below 0, +17 above 179)."""
  brightness, mode, contrast, saturation, hue = coins
  draws = [('int', brightness)] + ([('float', 27.3)] if brightness else [])
  draws += [('int', mode)]
  contrast_draws = [('int', contrast)] + ([('float', 1.37)] if contrast else [])
  if mode == 1:
    draws += contrast_draws
  draws += [('int', saturation)] + ([('float', 0.61)] if saturation else [])
  draws += [('int', hue)] + ([('int', -18 if brightness else 17)] if hue else [])
  if mode == 0:
    draws += contrast_draws
  rgb = _image()
  ours = Scripted(draws)
  got = transforms.photometric_distortion(rgb, ours)
  assert not ours.draws  # every draw used, in mmseg's order
  want = reference(np.ascontiguousarray(rgb[..., ::-1]), Scripted(draws))[..., ::-1]
  assert got.dtype == np.uint8 and got.shape == rgb.shape
  np.testing.assert_array_equal(got, want)
  if not (brightness or contrast or saturation or hue):
    np.testing.assert_array_equal(got, rgb)  # no coin came up: the image as it was


def test_statistics_over_many_draws_match_the_reference():
  """Driven by real generators (ours: numpy Generator; the reference: numpy RandomState, as
  mmseg uses): the mean and spread of the output's mean value, and how often the image is
  left as it was (1/16), agree within a few standard errors over 3000 draws."""
  rgb = _image(1, (12, 12))
  bgr = np.ascontiguousarray(rgb[..., ::-1])
  n = 3000
  ours = [transforms.photometric_distortion(rgb, np.random.default_rng(i)) for i in range(n)]
  state = np.random.RandomState(0)
  theirs = [reference(bgr, state)[..., ::-1] for _ in range(n)]
  a = np.array([x.mean() for x in ours])
  b = np.array([x.mean() for x in theirs])
  se = np.sqrt(a.var() / n + b.var() / n)
  assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
  assert abs(a.std() - b.std()) < 0.1 * b.std(), (a.std(), b.std())
  same_a = np.mean([np.array_equal(x, rgb) for x in ours])
  same_b = np.mean([np.array_equal(x, rgb) for x in theirs])
  assert abs(same_a - 1 / 16) < 0.025 and abs(same_b - 1 / 16) < 0.025, (same_a, same_b)
  assert all(x.dtype == np.uint8 for x in ours)


def test_input_checks_and_the_pipeline_switch():
  with pytest.raises(ValueError, match='uint8'):
    transforms.photometric_distortion(_image().astype(np.float32), np.random.default_rng(0))
  image = _image(2, (40, 40)).astype(np.float32)
  label = np.zeros((40, 40), np.uint8)
  on = transforms.AugmentConfig(
    crop_size=33, photometric=True, rotate_min=0, rotate_max=0, blur=False
  )
  off = transforms.AugmentConfig(crop_size=33, rotate_min=0, rotate_max=0, blur=False)
  rng = lambda: transforms.example_rng(0, 0, 3)
  a, la = transforms.augment(image, label, rng(), on)
  b, lb = transforms.augment(image, label, rng(), on)
  np.testing.assert_array_equal(a, b)  # one example, one draw: deterministic
  c, _ = transforms.augment(image, label, rng(), off)
  assert not np.array_equal(a, c) and a.dtype == np.float32


@pytest.mark.parametrize('size', [(40, 52), (20, 45), (12, 9)])
def test_crop_then_pad_is_the_plain_crop_when_nothing_is_distorted(size):
  """random_crop with ``distort`` cuts the window from the unpadded image and pads after:
  with an identity distortion it gives the plain crop exactly, the padded cases included,
  and the distortion sees only image pixels (never the padding)."""
  rng = np.random.default_rng(size[0])
  image = rng.uniform(0, 255, (*size, 3)).astype(np.float32)
  label = rng.integers(0, 4, size, dtype=np.uint8)
  for seed in range(6):
    plain = transforms.random_crop(image, label, np.random.default_rng(seed), 33)
    seen = []
    split = transforms.random_crop(
      image,
      label,
      np.random.default_rng(seed),
      33,
      distort=lambda p, seen=seen: seen.append(p) or p,
    )
    np.testing.assert_array_equal(split[0], plain[0])
    np.testing.assert_array_equal(split[1], plain[1])
    assert seen[0].shape[0] <= min(33, size[0]) and seen[0].shape[1] <= min(33, size[1])


def mmcv_random_resize(img, seg, random, scale, ratio_range):
  """mmcv's RandomResize(scale, ratio_range, keep_ratio=True) then Resize: the scale times a
  ratio (sides truncated), rescale_size's factor (long side and short side within it), new
  sides rounded half up, bilinear image, nearest label."""
  ratio = random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  target = int(scale[0] * ratio), int(scale[1] * ratio)
  h, w = seg.shape
  factor = min(max(target) / max(h, w), min(target) / min(h, w))
  new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
  return (
    cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR),
    cv2.resize(seg, (new_w, new_h), interpolation=cv2.INTER_NEAREST),
  )


@pytest.mark.parametrize(
  'size, scale, unit',
  [
    ((512, 683), (2048, 512), 0.31),
    ((683, 512), (2048, 512), 0.9),
    ((1024, 2048), (2048, 1024), 0.0),
    ((300, 301), (2048, 512), 0.77),
  ],
)
def test_random_rescale_is_mmcvs_random_resize(size, scale, unit):
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  seg = rng.integers(0, 5, size, dtype=np.uint8)
  got = transforms.random_rescale(img, seg, Scripted([('unit', unit)]), scale, 0.5, 2.0)
  want = mmcv_random_resize(img, seg, Scripted([('unit', unit)]), scale, (0.5, 2.0))
  assert got[0].shape == want[0].shape
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def mmseg_crop_bbox(seg, random, crop, cat_max_ratio, ignore=255):
  """mmseg's RandomCrop.crop_bbox for an image at least as large as the crop."""

  def generate():
    offset_h = random.randint(0, max(seg.shape[0] - crop, 0) + 1)
    offset_w = random.randint(0, max(seg.shape[1] - crop, 0) + 1)
    return offset_h, offset_h + crop, offset_w, offset_w + crop

  bbox = generate()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      y1, y2, x1, x2 = bbox
      labels, cnt = np.unique(seg[y1:y2, x1:x2], return_counts=True)
      cnt = cnt[labels != ignore]
      if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
        break
      bbox = generate()
  return bbox


def test_cat_max_ratio_redraws_the_window_as_mmsegs_random_crop():
  """A label that is one class but for a 20x20 patch of another: windows that miss the
  patch (or hold too little of it) are redrawn, up to 10 times, and the last one is kept;
  the chosen window equals the reference's for the same draws, in both outcomes."""
  seg = np.zeros((60, 80), np.uint8)
  seg[5:25, 50:70] = 1
  seg[40:, :3] = 255  # ignored pixels do not count
  img = np.repeat(seg[..., None] * 100, 3, -1).astype(np.float32)
  crop = 30
  miss = [('int', 30), ('int', 0)]  # bottom left: class 0 alone (and ignored pixels)
  hit = [('int', 0), ('int', 45)]  # holds the patch: class 1 is 400 of 900
  last = [('int', 30), ('int', 10)]  # another miss: the one kept after 10 redraws
  # found: the first window and 3 redraws miss, the 4th hits; gave up: all 11 miss (and
  # a 12th draw would find no draws left).
  for draws, outcome in ((miss * 4 + hit, 'found'), (miss * 10 + last, 'gave up')):
    ours_draws, theirs_draws = list(draws), list(draws)
    y1, y2, x1, x2 = mmseg_crop_bbox(seg, Scripted(theirs_draws), crop, 0.75)
    got_img, got_seg = transforms.random_crop(
      img, seg, Scripted(ours_draws), crop, cat_max_ratio=0.75
    )
    np.testing.assert_array_equal(got_seg, seg[y1:y2, x1:x2], err_msg=outcome)
    np.testing.assert_array_equal(got_img, img[y1:y2, x1:x2], err_msg=outcome)
    labels = set(np.unique(got_seg)) - {255}
    assert (labels == {0, 1}) == (outcome == 'found'), (outcome, labels)
  assert (y1, x1) == (30, 10)  # gave up: the last window drawn


def test_a_zero_hue_delta_leaves_the_hue_alone():
  """mmseg's randint(-0, 0) would fail; here hue_delta=0 is a hue step that shifts nothing
  (the coin is still drawn: the other draws keep their places)."""
  draws = [('int', 0), ('int', 0), ('int', 0), ('int', 1), ('int', 0)]  # only the hue coin
  rgb = _image(3)
  got = transforms.photometric_distortion(rgb, Scripted(draws), hue_delta=0)
  hsv_round_trip = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), cv2.COLOR_HSV2RGB)
  np.testing.assert_array_equal(got, hsv_round_trip)
