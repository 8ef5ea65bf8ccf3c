"""synthetic_shapes, the prepare/read interface, augmentation invariants, and the training
pipeline's determinism, resumption and per-host sharding."""

import json
import os
import runpy
import sys

import numpy as np
import pytest

from pspnet_jax import data
from pspnet_jax.data import input_pipeline, transforms
from pspnet_jax.data.builders import synthetic_shapes
from pspnet_jax.normalize import MEAN, STD

SMALL = dict(image_size=48, num_train=24, num_val=8, seed=3)
CROP = 33


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('prepared'))
  data.prepare('synthetic_shapes', path, **SMALL)
  return path


def _loader(data_dir, **kwargs):
  args = dict(
    global_batch_size=4,
    augment=data.AugmentConfig(crop_size=CROP),
    seed=0,
    process_index=0,
    process_count=1,
  )
  args.update(kwargs)
  return data.train_loader('synthetic_shapes', 'train', data_dir, **args)


# --- synthetic_shapes and the prepare/read interface ---------------------------------------


def test_synthetic_metadata_and_splits(data_dir):
  info = data.dataset_info('synthetic_shapes', data_dir)
  assert info.splits == {'train': 24, 'val': 8}
  assert info.num_classes == 4 and info.class_names[0] == 'background'
  assert len(info.palette) == 4 and info.ignore_label == 255 and info.base_size == 48
  # Idempotent: returns the same without preparing again.
  assert data.prepare('synthetic_shapes', data_dir, **SMALL) == info
  with pytest.raises(ValueError, match='prepared with'):
    data.prepare('synthetic_shapes', data_dir, image_size=64)


def test_eval_source_examples(data_dir):
  src = data.eval_source('synthetic_shapes', 'val', data_dir)
  assert len(src) == 8
  ids = set()
  for i in range(len(src)):
    ex = src[i]
    assert ex['image'].shape == (48, 48, 3) and ex['image'].dtype == np.uint8
    assert ex['label'].shape == (48, 48) and ex['label'].dtype == np.uint8
    assert set(np.unique(ex['label'])) <= {0, 1, 2, 3}
    ids.add(ex['id'])
  assert len(ids) == 8
  # What was stored is exactly what the generator made (PNG is lossless).
  index = int(ex['id'].rsplit('_', 1)[1])
  image, label = synthetic_shapes.make_example(SMALL['seed'], 1, index, 48)
  np.testing.assert_array_equal(ex['image'], image)
  np.testing.assert_array_equal(ex['label'], label)


def test_synthetic_is_deterministic_and_varied():
  a = synthetic_shapes.make_example(7, 0, 5, 96)
  b = synthetic_shapes.make_example(7, 0, 5, 96)
  c = synthetic_shapes.make_example(8, 0, 5, 96)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  classes = set()
  for i in range(20):
    classes |= set(np.unique(synthetic_shapes.make_example(0, 0, i, 96)[1]).tolist())
  assert classes == {0, 1, 2, 3}


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m pspnet_jax.data.prepare synthetic_shapes'):
    data.dataset_info('synthetic_shapes', str(tmp_path))
  with pytest.raises(ValueError, match='unknown dataset'):
    data.prepare('nope', str(tmp_path))


def test_prepare_command_line(tmp_path, monkeypatch, capsys):
  argv = [
    'prepare',
    'synthetic_shapes',
    '--data-dir',
    str(tmp_path),
    '--option',
    'image_size=32',
    '--option',
    'num_train=3',
    '--option',
    'num_val=2',
  ]
  monkeypatch.setattr(sys, 'argv', argv)
  with pytest.raises(SystemExit) as e:
    runpy.run_module('pspnet_jax.data.prepare', run_name='__main__')
  assert e.value.code == 0
  assert "splits {'train': 3, 'val': 2}" in capsys.readouterr().out
  assert os.path.isfile(tmp_path / 'synthetic_shapes' / '1.0.0' / 'metadata.json')


# --- augmentation invariants -------------------------------------------------------------

COLOURS = np.array(
  [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.float32
)


def _colour_coded(h=160, w=200, block=32):
  """A label of diagonal bands of blocks (no mirror symmetry, so a flipped label disagrees)
  and an image whose colour encodes each pixel's label."""
  yy, xx = np.mgrid[:h, :w]
  label = ((xx // block + 2 * (yy // block)) % len(COLOURS)).astype(np.uint8)
  return COLOURS[label].astype(np.uint8), label


def _denormalise(image):
  return image * STD + MEAN


@pytest.mark.parametrize('seed', range(12))
def test_augment_keeps_labels_and_alignment(seed):
  image, label = _colour_coded()
  out_image, out_label = transforms.augment(
    image, label, transforms.example_rng(seed, 0, 0), data.AugmentConfig(crop_size=97)
  )
  assert out_image.shape == (97, 97, 3) and out_image.dtype == np.float32
  assert out_label.shape == (97, 97) and out_label.dtype == np.int32
  assert set(np.unique(out_label)) <= set(np.unique(label).tolist()) | {255}
  # Alignment: the palette colour nearest to each labelled pixel is its label's colour.
  # Resampling blends colours across block edges, and semseg's cv2 INTER_NEAREST samples
  # half a pixel off INTER_LINEAR, so a small fraction of edge pixels may disagree;
  # a misaligned label (flip, offset, transposition) would disagree on a large fraction.
  valid = out_label != 255
  rgb = _denormalise(out_image)[valid]
  nearest = np.argmin(((rgb[:, None, :] - COLOURS[None]) ** 2).sum(-1), axis=1)
  agreement = np.mean(nearest == out_label[valid])
  assert agreement > 0.9, agreement
  flipped = out_label[:, ::-1][valid]  # a control: a label misaligned on purpose
  assert np.mean(nearest == flipped) < agreement - 0.3


def test_crop_padding_is_mean_and_ignore():
  image = np.full((20, 30, 3), 200, np.uint8)
  label = np.ones((20, 30), np.uint8)
  config = data.AugmentConfig(
    crop_size=65, scale_min=1, scale_max=1, rotate_min=0, rotate_max=0, blur=False
  )
  out_image, out_label = transforms.augment(image, label, np.random.default_rng(0), config)
  pad = out_label == 255
  assert pad.sum() == 65 * 65 - 20 * 30
  np.testing.assert_array_equal(out_image[pad], 0)  # the mean, normalised
  np.testing.assert_allclose(_denormalise(out_image[~pad]), 200, atol=1e-3)
  # Centred: the image occupies rows 22..41 and columns 17..46.
  rows, cols = np.nonzero(~pad)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (22, 41, 17, 46)
  # Another model's normalisation (a Caffe port's: its mean, std 1) pads with its mean.
  mean, std = (123.68, 116.779, 103.939), (1.0, 1.0, 1.0)
  out_image, _ = transforms.augment(image, label, np.random.default_rng(0), config, mean, std)
  np.testing.assert_array_equal(out_image[pad], 0)
  np.testing.assert_allclose(
    out_image[~pad], np.broadcast_to(200 - np.float32(mean), (600, 3)), atol=1e-4
  )


def test_rotation_border_is_mean_and_ignore():
  image = np.full((50, 50, 3), 10, np.float32)
  label = np.zeros((50, 50), np.uint8)
  out_image, out_label = transforms.random_rotate(
    image, label, np.random.default_rng(0), 30, 30, p=1.0
  )
  assert out_label[0, 0] == 255 and out_label[25, 25] == 0
  np.testing.assert_allclose(out_image[0, 0], MEAN, rtol=1e-6)


class _Always:
  """A stand-in generator whose random() always passes a probability test."""

  def random(self):
    return 0.0


def test_small_transforms():
  image = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6, 8, 3)
  label = np.arange(48, dtype=np.uint8).reshape(6, 8)
  flipped_image, flipped_label = transforms.random_hflip(image, label, _Always())
  np.testing.assert_array_equal(flipped_image, image[:, ::-1])
  np.testing.assert_array_equal(flipped_label, label[:, ::-1])
  scaled_image, scaled_label = transforms.random_scale(image, label, _Always(), 1.5, 1.5)
  assert scaled_image.shape == (9, 12, 3) and scaled_label.shape == (9, 12)
  assert set(np.unique(scaled_label)) <= set(range(48))  # nearest: no new values
  blurred = transforms.random_gaussian_blur(image, _Always())
  assert blurred.shape == image.shape and not np.array_equal(blurred, image)
  # Probability 0.5 draws are independent per example: about half of 200 blur.
  blurs = sum(
    transforms.random_gaussian_blur(image, transforms.example_rng(0, 0, i)) is not image
    for i in range(200)
  )
  assert 70 < blurs < 130


# --- the training pipeline -------------------------------------------------------------------


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _same_images(batches_a, batches_b):
  return all(np.array_equal(a['image'], b['image']) for a, b in zip(batches_a, batches_b))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_batches_shapes_and_same_seed_same_batches(data_dir):
  first = _take(_loader(data_dir), 8)  # 6 steps an epoch: crosses into the second epoch
  assert first[0]['image'].shape == (4, CROP, CROP, 3) and first[0]['image'].dtype == np.float32
  assert first[0]['label'].shape == (4, CROP, CROP) and first[0]['label'].dtype == np.int32
  _assert_same(first, _take(_loader(data_dir), 8))
  other = next(_loader(data_dir, seed=1))
  assert not np.array_equal(other['image'], first[0]['image'])


def test_restored_state_gives_identical_following_batches(data_dir):
  loader = _loader(data_dir)
  _take(loader, 5)
  state = json.loads(json.dumps(loader.get_state()))  # must survive JSON
  following = _take(loader, 3)
  restored = _loader(data_dir)
  restored.set_state(state)
  _assert_same(following, _take(restored, 3))
  with pytest.raises(ValueError, match='another input pipeline'):
    _loader(data_dir, seed=5).set_state(state)


def test_worker_processes_give_the_same_batches(data_dir):
  """With mmseg's pipeline on (a base-scale resize, the crop's class-balance redraws, the
  photometric distortion): its draws come from each example's own generator too, so
  worker processes change no pixel."""
  augment = data.AugmentConfig(
    crop_size=CROP, photometric=True, scale_base=(2 * CROP, CROP), cat_max_ratio=0.75
  )
  plain = _take(_loader(data_dir, augment=augment), 3)
  assert not _same_images(plain, _take(_loader(data_dir), 3))  # it does distort
  loader = _loader(data_dir, worker_count=2, augment=augment)
  try:
    _assert_same(plain, _take(loader, 3))
  finally:
    loader.close()


def test_processes_split_each_global_batch(data_dir):
  whole = _take(_loader(data_dir), 2)
  for count in (2, 4):
    parts = [
      _take(_loader(data_dir, process_index=i, process_count=count), 2) for i in range(count)
    ]
    for step in range(2):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), whole[step][key]
        )
  with pytest.raises(ValueError, match='not divisible'):
    _loader(data_dir, process_count=3)


@pytest.mark.parametrize('num_examples', [48, 53])
@pytest.mark.parametrize('count', [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_each_epoch(num_examples, count):
  global_batch = 12
  local = global_batch // count
  steps = num_examples // global_batch
  streams = [
    input_pipeline._Positions(num_examples, global_batch, local, i, seed=0, start_step=0)
    for i in range(count)
  ]
  epochs = []
  for epoch in range(2):
    seen = []
    for step in range(steps):
      batch = []
      for stream in streams:
        items = [stream[(epoch * steps + step) * local + j] for j in range(local)]
        assert all(e == epoch for e, _, _ in items)
        batch += [r for _, _, r in items]
      assert len(set(batch)) == global_batch  # disjoint across processes
      seen += batch
    assert len(set(seen)) == steps * global_batch  # an epoch never repeats an example
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  if num_examples % global_batch == 0:
    assert sorted(epochs[0]) == list(range(num_examples))


def test_steps_per_epoch(data_dir):
  assert data.steps_per_epoch('synthetic_shapes', 'train', data_dir, 4) == 6
  assert data.steps_per_epoch('synthetic_shapes', 'train', data_dir, 5) == 4
  with pytest.raises(ValueError):
    data.steps_per_epoch('synthetic_shapes', 'train', data_dir, 25)
