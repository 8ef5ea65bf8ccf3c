"""Each builder prepared from tiny fake raw files in its dataset's real on-disk layout:
split sizes, label mappings, metadata, and every kind of bad input."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import scipy.io
from cli import cli_env, one_error_line
from PIL import Image

from pspnet_jax import data
from pspnet_jax.data.builders import cityscapes_trainid


def _png(array: np.ndarray, palette: bool = False) -> bytes:
  image = Image.fromarray(array)
  if palette:  # VOC's labels are palette PNGs
    image = image.convert('P') if array.ndim == 3 else Image.fromarray(array, 'P')
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
  buf = io.BytesIO()
  image.save(buf, 'PNG')
  return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'JPEG')
  return buf.getvalue()


def _image(seed, h=12, w=16):
  return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _write(path, content: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)


def _labels(src):
  return {src[i]['id']: src[i]['label'] for i in range(len(src))}


def _assert_nothing_prepared(name, data_dir):
  with pytest.raises(FileNotFoundError, match='not prepared'):
    data.dataset_info(name, data_dir)
  leftovers = [os.path.join(d, f) for d, _, fs in os.walk(data_dir) for f in fs if name in d]
  assert not leftovers, leftovers


# --- ADE20K -------------------------------------------------------------------------------

ADE_LABEL = np.array([[0, 1, 150, 42]] * 3, np.uint8).repeat(4, axis=1)  # [3, 16]


def _ade_zip(path, bad=None):
  """ADEChallengeData2016.zip with 3 training and 2 validation images (3x16)."""
  with zipfile.ZipFile(path, 'w') as z:
    for folder, n in (('training', 3), ('validation', 2)):
      for i in range(n):
        stem = f'ADE_{folder[:5]}_{i + 1:08d}'
        image, label = _jpg(_image(i, 3, 16)), _png(ADE_LABEL)
        if bad == 'image' and folder == 'training' and i == 1:
          image = b'not a jpeg'
        if bad == 'value' and folder == 'validation' and i == 0:
          label = _png(np.full((3, 16), 151, np.uint8))
        z.writestr(f'ADEChallengeData2016/images/{folder}/{stem}.jpg', image)
        if not (bad == 'missing' and folder == 'training' and i == 2):
          z.writestr(f'ADEChallengeData2016/annotations/{folder}/{stem}.png', label)
    z.writestr('ADEChallengeData2016/objectInfo150.txt', 'Idx\tRatio\tTrain\tVal\tName\n')


@pytest.mark.parametrize('unzipped', [False, True])
def test_ade20k(tmp_path, unzipped):
  manual, out = tmp_path / 'manual', str(tmp_path / 'out')
  manual.mkdir()
  _ade_zip(manual / 'ADEChallengeData2016.zip')
  if unzipped:
    with zipfile.ZipFile(manual / 'ADEChallengeData2016.zip') as z:
      z.extractall(manual)
    os.remove(manual / 'ADEChallengeData2016.zip')
  info = data.prepare('ade20k', out, str(manual))
  assert info.splits == {'train': 3, 'val': 2}
  assert info.num_classes == 150 and info.class_names[:3] == ('wall', 'building', 'sky')
  assert info.base_size == 512 and info.ignore_label == 255 and len(info.palette) == 150
  labels = _labels(data.eval_source('ade20k', 'val', out))
  assert sorted(labels) == ['ADE_valid_00000001', 'ADE_valid_00000002']
  expected = np.array([[255, 0, 149, 41]] * 3, np.uint8).repeat(4, axis=1)
  for label in labels.values():
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize(
  'bad, message',
  [
    ('image', r'ADE_train_00000002\.jpg: cannot decode the image'),
    ('missing', r'ADE_train_00000003\.png: cannot read the label'),
    ('value', r'ADE_valid_00000001\.png: label values \[151\] are not allowed'),
  ],
)
def test_ade20k_bad_examples(tmp_path, bad, message):
  manual, out = tmp_path / 'manual', str(tmp_path / 'out')
  manual.mkdir()
  _ade_zip(manual / 'ADEChallengeData2016.zip', bad=bad)
  with pytest.raises(data.BadExampleError, match=message) as e:
    data.prepare('ade20k', out, str(manual))
  assert '--skip-bad-examples' in str(e.value)
  _assert_nothing_prepared('ade20k', out)
  info = data.prepare('ade20k', out, str(manual), skip_bad_examples=True)
  assert sum(info.splits.values()) == 4 and info.metadata['skipped_examples'] == 1


def test_ade20k_missing_archive_says_what_to_download(tmp_path):
  with pytest.raises(data.ManualDirError, match='ADEChallengeData2016.zip'):
    data.prepare('ade20k', str(tmp_path / 'out'), str(tmp_path))


# --- Cityscapes ---------------------------------------------------------------------------


def _cityscapes(root, bad=None):
  """leftImg8bit/ and gtFine/ with 2 train images (2 cities) and 1 val image (4x6)."""
  label_ids = np.array([[0, 7, 8, 26, 33, 1]] * 4, np.uint8)
  for split, names in (
    ('train', ['aachen_000000_000019', 'bochum_000000_000313']),
    ('val', ['frankfurt_000000_000294']),
  ):
    for name in names:
      city = name.split('_')[0]
      label = label_ids if bad != 'size' else label_ids[:3]
      _write(f'{root}/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png', _png(_image(1, 4, 6)))
      if not (bad == 'missing_label' and city == 'bochum'):
        _write(f'{root}/gtFine/{split}/{city}/{name}_gtFine_labelIds.png', _png(label))
      _write(f'{root}/gtFine/{split}/{city}/{name}_gtFine_color.png', _png(_image(2, 4, 6)))


def test_cityscapes_trainids(tmp_path):
  _cityscapes(tmp_path / 'manual')
  out = str(tmp_path / 'out')
  info = data.prepare('cityscapes_trainid', out, str(tmp_path / 'manual'))
  assert info.splits == {'train': 2, 'val': 1}
  assert info.num_classes == 19 and info.class_names[0] == 'road' and info.base_size == 2048
  assert info.palette[13] == (0, 0, 142)
  assert info.metadata['train_id_to_label_id'] == list(cityscapes_trainid.TRAIN_ID_TO_LABEL_ID)
  labels = _labels(data.eval_source('cityscapes_trainid', 'val', out))
  np.testing.assert_array_equal(
    labels['frankfurt_000000_000294'], np.array([[255, 0, 1, 13, 18, 255]] * 4, np.uint8)
  )


def test_cityscapes_bad_inputs(tmp_path):
  out = str(tmp_path / 'out')
  with pytest.raises(data.ManualDirError, match='gtFine_trainvaltest.zip'):
    data.prepare('cityscapes_trainid', out, str(tmp_path / 'nowhere'))
  _cityscapes(tmp_path / 'a', bad='size')
  with pytest.raises(
    data.BadExampleError,
    match=r'aachen_000000_000019_gtFine_labelIds\.png: '
    r'label size 6x3 \(WxH\) differs',
  ):
    data.prepare('cityscapes_trainid', out, str(tmp_path / 'a'))
  _assert_nothing_prepared('cityscapes_trainid', out)
  _cityscapes(tmp_path / 'b', bad='missing_label')
  info = data.prepare('cityscapes_trainid', out, str(tmp_path / 'b'), skip_bad_examples=True)
  assert info.splits == {'train': 1, 'val': 1} and info.metadata['skipped_examples'] == 1


# --- VOC 2012 + SBD -----------------------------------------------------------------------


def _voc(root):
  """VOC: train a, b; val c. SBD: train b, d; val c, e. -> train_aug a, b, d, e; val c."""
  voc, sbd = f'{root}/VOCdevkit/VOC2012', f'{root}/benchmark_RELEASE/dataset'
  for i, name in enumerate('abcde'):
    _write(f'{voc}/JPEGImages/{name}.jpg', _jpg(_image(i, 5, 7)))
  for name in 'abc':  # VOC's palette PNGs, with 255 borders
    _write(
      f'{voc}/SegmentationClass/{name}.png',
      _png(np.array([[0, 1, 20, 255, 3, 3, 3]] * 5, np.uint8), palette=True),
    )
  for name in 'bcde':
    os.makedirs(f'{sbd}/cls', exist_ok=True)
    segmentation = np.full((5, 7), 7, np.uint8)
    scipy.io.savemat(
      f'{sbd}/cls/{name}.mat',
      {
        'GTcls': {
          'Segmentation': segmentation,
          'Boundaries': np.zeros((1, 1), object),
          'CategoriesPresent': np.array([7], np.uint8),
        }
      },
    )
  for path, names in (
    (f'{voc}/ImageSets/Segmentation/train.txt', 'ab'),
    (f'{voc}/ImageSets/Segmentation/val.txt', 'c'),
    (f'{sbd}/train.txt', 'bd'),
    (f'{sbd}/val.txt', 'ce'),
  ):
    _write(path, ''.join(f'{n}\n' for n in names).encode())


def test_voc2012_aug(tmp_path):
  _voc(tmp_path / 'manual')
  out = str(tmp_path / 'out')
  info = data.prepare('voc2012_aug', out, str(tmp_path / 'manual'))
  assert info.splits == {'train_aug': 4, 'val': 1}
  assert info.num_classes == 21 and info.class_names[15] == 'person' and info.base_size == 512
  assert info.palette[1] == (128, 0, 0)
  labels = _labels(data.eval_source('voc2012_aug', 'train_aug', out))
  assert sorted(labels) == list('abde')
  voc_label = np.array([[0, 1, 20, 255, 3, 3, 3]] * 5, np.uint8)
  np.testing.assert_array_equal(labels['b'], voc_label)  # VOC's PNG wins over SBD's .mat
  np.testing.assert_array_equal(labels['d'], np.full((5, 7), 7, np.uint8))


def test_voc2012_aug_missing_sbd(tmp_path):
  _voc(tmp_path / 'manual')
  os.rename(tmp_path / 'manual' / 'benchmark_RELEASE', tmp_path / 'elsewhere')
  with pytest.raises(data.ManualDirError, match='benchmark.tgz'):
    data.prepare('voc2012_aug', str(tmp_path / 'out'), str(tmp_path / 'manual'))


# --- a user's folder ----------------------------------------------------------------------


def _folder(root, layout='folders', bad=None):
  """3 classes; train 3 images, val 1; class file as YAML (folders) or JSON (list files)."""
  label = np.array([[0, 1, 2, 255]] * 3, np.uint8)
  pairs = {'train': ['x0', 'x1', 'x2'], 'val': ['y0']}
  if layout == 'folders':
    _write(
      f'{root}/classes.yaml',
      b'classes: [background, field, road]\n'
      b'palette: [[0, 0, 0], [0, 200, 0], [90, 90, 90]]\nbase_size: 256\n',
    )
  else:
    _write(f'{root}/classes.json', json.dumps(['background', 'field', 'road']).encode())
  for split, names in pairs.items():
    lines = []
    for i, name in enumerate(names):
      image, lab = _png(_image(i, 3, 4)), _png(label)
      if bad == 'undecodable' and name == 'x1':
        image = b'\x89PNG broken'
      if bad == 'rgb_label' and name == 'x1':
        lab = _png(np.zeros((3, 4, 3), np.uint8))
      if bad == 'value' and name == 'x2':
        lab = _png(np.full((3, 4), 3, np.uint8))
      if bad == 'size' and name == 'x0':
        lab = _png(np.zeros((4, 4), np.uint8))
      _write(f'{root}/images/{split}/{name}.png', image)
      _write(f'{root}/labels/{split}/{name}.png', lab)
      lines.append(f'images/{split}/{name}.png labels/{split}/{name}.png\n')
    if bad == 'nowhere' and split == 'train':
      lines.append('images/train/gone.png labels/train/gone.png\n')
    if layout == 'lists':
      _write(f'{root}/{split}.txt', ''.join(lines).encode())


@pytest.mark.parametrize('layout', ['folders', 'lists'])
def test_segmentation_folder(tmp_path, layout):
  root, out = tmp_path / 'mine', str(tmp_path / 'out')
  _folder(root, layout)
  info = data.prepare('segmentation_folder', out, root=str(root))
  assert info.splits == {'train': 3, 'val': 1}
  assert info.class_names == ('background', 'field', 'road')
  if layout == 'folders':
    assert info.palette == ((0, 0, 0), (0, 200, 0), (90, 90, 90)) and info.base_size == 256
  ex = data.eval_source('segmentation_folder', 'val', out)[0]
  assert ex['id'] == 'images/val/y0'
  np.testing.assert_array_equal(ex['label'], np.array([[0, 1, 2, 255]] * 3, np.uint8))
  np.testing.assert_array_equal(ex['image'], _image(0, 3, 4))


@pytest.mark.parametrize(
  'bad, message',
  [
    ('undecodable', r'images/train/x1\.png: cannot decode the image'),
    ('rgb_label', r'labels/train/x1\.png: the label image has mode RGB'),
    ('value', r'labels/train/x2\.png: label values \[3\] are not allowed \(classes are 0\.\.2'),
    ('size', r'labels/train/x0\.png: label size 4x4 \(WxH\) differs'),
    ('nowhere', r'train\.txt:4: .*gone\.png: cannot read the image'),
  ],
)
def test_segmentation_folder_bad_examples(tmp_path, bad, message):
  root, out = tmp_path / 'mine', str(tmp_path / 'out')
  _folder(root, 'lists', bad=bad)
  with pytest.raises(data.BadExampleError, match=message):
    data.prepare('segmentation_folder', out, root=str(root))
  _assert_nothing_prepared('segmentation_folder', out)
  info = data.prepare('segmentation_folder', out, root=str(root), skip_bad_examples=True)
  assert info.metadata['skipped_examples'] == 1
  assert sum(info.splits.values()) == 4 - (bad != 'nowhere')


def test_segmentation_folder_needs_a_class_file(tmp_path):
  _folder(tmp_path / 'mine')
  os.remove(tmp_path / 'mine' / 'classes.yaml')
  with pytest.raises(data.ManualDirError, match='no class file'):
    data.prepare('segmentation_folder', str(tmp_path / 'out'), root=str(tmp_path / 'mine'))


# --- the prepare command on bad input ------------------------------------------------------


def _prepare_cli(*args):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.data.prepare', *args],
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
    cwd=root,
  )


def test_prepare_cli_refusals_are_one_line_and_write_nothing(tmp_path):
  """A label out of range, a dataset already prepared with other options, and a data dir
  that cannot be written: exit 2, one ``error:`` line naming the file or option, and the
  data dir as it was."""
  root, out = tmp_path / 'mine', tmp_path / 'out'
  _folder(root, 'lists', bad='value')
  line = one_error_line(
    _prepare_cli('segmentation_folder', '--data-dir', str(out), '--option', f'root={root}')
  )
  assert 'labels/train/x2.png' in line and 'label values [3] are not allowed' in line, line
  assert '--skip-bad-examples' in line, line
  _assert_nothing_prepared('segmentation_folder', str(out))

  small = ['--option', 'image_size=16', '--option', 'num_train=2', '--option', 'num_val=1']
  p = _prepare_cli('synthetic_shapes', '--data-dir', str(out), *small)
  assert p.returncode == 0, p.stderr[-3000:]
  before = {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs}
  line = one_error_line(
    _prepare_cli('synthetic_shapes', '--data-dir', str(out), *small[:-2], '--option', 'num_val=3')
  )
  assert 'num_val=1 (prepared) vs 3 (asked)' in line and 'num_train' not in line, line
  assert {
    f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
  } == before

  a_file = tmp_path / 'not_a_dir'
  a_file.write_text('x')
  line = one_error_line(
    _prepare_cli('synthetic_shapes', '--data-dir', str(a_file / 'data'), *small)
  )
  assert str(a_file) in line and 'is not a folder' in line, line
  assert a_file.read_text() == 'x'
