"""ade20k: ADE20K SceneParsing (MIT Scene Parsing Benchmark, 150 classes) as semseg uses it.

Raw data: ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip),
in --manual-dir as the zip or unzipped (ADEChallengeData2016/), else downloaded by TFDS:
  ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   (0 = other, 1..150)
Labels 1..150 become 0..149 and 0 ("other") becomes 255, as semseg's lists do.
Splits: train (20,210), val (2,000).
"""

import os
import zipfile

from pspnet_jax.data.builders import base

URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
ROOT = 'ADEChallengeData2016'
SPLITS = {'train': 'training', 'val': 'validation'}

CLASS_NAMES = (
  'wall',
  'building',
  'sky',
  'floor',
  'tree',
  'ceiling',
  'road',
  'bed',
  'windowpane',
  'grass',
  'cabinet',
  'sidewalk',
  'person',
  'earth',
  'door',
  'table',
  'mountain',
  'plant',
  'curtain',
  'chair',
  'car',
  'water',
  'painting',
  'sofa',
  'shelf',
  'house',
  'sea',
  'mirror',
  'rug',
  'field',
  'armchair',
  'seat',
  'fence',
  'desk',
  'rock',
  'wardrobe',
  'lamp',
  'bathtub',
  'railing',
  'cushion',
  'base',
  'box',
  'column',
  'signboard',
  'chest of drawers',
  'counter',
  'sand',
  'sink',
  'skyscraper',
  'fireplace',
  'refrigerator',
  'grandstand',
  'path',
  'stairs',
  'runway',
  'case',
  'pool table',
  'pillow',
  'screen door',
  'stairway',
  'river',
  'bridge',
  'bookcase',
  'blind',
  'coffee table',
  'toilet',
  'flower',
  'book',
  'hill',
  'bench',
  'countertop',
  'stove',
  'palm',
  'kitchen island',
  'computer',
  'swivel chair',
  'boat',
  'bar',
  'arcade machine',
  'hovel',
  'bus',
  'towel',
  'light',
  'truck',
  'tower',
  'chandelier',
  'awning',
  'streetlight',
  'booth',
  'television receiver',
  'airplane',
  'dirt track',
  'apparel',
  'pole',
  'land',
  'bannister',
  'escalator',
  'ottoman',
  'bottle',
  'buffet',
  'poster',
  'stage',
  'van',
  'ship',
  'fountain',
  'conveyer belt',
  'canopy',
  'washer',
  'plaything',
  'swimming pool',
  'stool',
  'barrel',
  'basket',
  'waterfall',
  'tent',
  'bag',
  'minibike',
  'cradle',
  'oven',
  'ball',
  'food',
  'step',
  'tank',
  'trade name',
  'microwave',
  'pot',
  'animal',
  'bicycle',
  'lake',
  'dishwasher',
  'screen',
  'blanket',
  'sculpture',
  'hood',
  'sconce',
  'vase',
  'traffic light',
  'tray',
  'ashcan',
  'fan',
  'pier',
  'crt screen',
  'plate',
  'monitor',
  'bulletin board',
  'shower',
  'radiator',
  'glass',
  'clock',
  'flag',
)
assert len(CLASS_NAMES) == 150


class _Files:
  """The dataset's files, from the zip or the unzipped folder: names relative to ROOT/."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      self._zip = None
      self.names = {
        os.path.relpath(os.path.join(d, f), path).replace(os.sep, '/')
        for d, _, fs in os.walk(path)
        for f in fs
      }
    else:
      try:
        self._zip = zipfile.ZipFile(path)
      except (OSError, zipfile.BadZipFile) as e:
        raise base.ManualDirError(
          f'{path}: not a readable zip ({e}). Download it again from {URL}.'
        ) from e
      prefix = f'{ROOT}/'
      self.names = {n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix)}

  def read(self, name: str) -> bytes:
    if self._zip is None:
      with open(os.path.join(self.path, name), 'rb') as f:
        return f.read()
    return self._zip.read(f'{ROOT}/{name}')

  def where(self, name: str) -> str:
    return os.path.join(self.path, name) if self._zip is None else f'{self.path}:{ROOT}/{name}'


class Ade20k(base.SegmentationBuilder):
  """ADE20K, 150 classes (semseg's label convention)."""

  DESCRIPTION = __doc__
  CLASS_NAMES = CLASS_NAMES
  BASE_SIZE = 512
  VALID_RAW_HINT = 'ADE20K annotations hold 0 (other) and 1..150'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put ADEChallengeData2016.zip from {URL} in the manual dir.'

  def label_map(self):
    return base.label_lookup({k: k - 1 for k in range(1, 151)}, range(151))

  def _split_generators(self, dl_manager):
    if self.manual_dir:  # the user chose to supply the files: never download behind them
      candidates = [
        os.path.join(self.manual_dir, f'{ROOT}.zip'),
        os.path.join(self.manual_dir, ROOT),
      ]
      path = next((c for c in candidates if os.path.exists(c)), None)
      if path is None:
        raise base.ManualDirError(
          f'neither {candidates[0]} nor {candidates[1]}/ exists. Download {URL} into '
          f'{self.manual_dir} (or leave out --manual-dir to let TFDS download it).'
        )
    else:
      path = os.fspath(dl_manager.download(URL))
    files = _Files(path)
    raws = {}
    for split, folder in SPLITS.items():
      images = sorted(
        n for n in files.names if n.startswith(f'images/{folder}/') and n.endswith('.jpg')
      )
      if not images:
        raise base.ManualDirError(
          f'{path} has no images/{folder}/*.jpg under {ROOT}/: not the ADE20K '
          f'SceneParsing release. Download {URL} and put the zip in --manual-dir.'
        )
      raws[split] = self._raws(files, images, folder)
    return self.generate_splits(raws)

  def _raws(self, files: _Files, images, folder):
    for image in images:
      stem = image.rsplit('/', 1)[1][: -len('.jpg')]
      label = f'annotations/{folder}/{stem}.png'
      yield base.RawExample(
        key=stem,
        id=stem,
        image_name=files.where(image),
        label_name=files.where(label),
        read_image=lambda n=image: files.read(n),
        read_label=lambda n=label: files.read(n),
      )
