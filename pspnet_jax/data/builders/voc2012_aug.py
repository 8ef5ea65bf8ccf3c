"""voc2012_aug: Pascal VOC 2012 segmentation with the SBD extra annotations ("train_aug").

Raw data, in --manual-dir, unpacked (or downloaded by TFDS when absent):
  VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}
      from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
  benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}
      (SBD) from http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
Splits: train_aug = (VOC train + SBD train + SBD val) - VOC val (10,582 images), val = VOC
val (1,449). A VOC SegmentationClass PNG is used where one exists (it marks object borders
255); otherwise SBD's class map (cls/NAME.mat, GTcls.Segmentation, read with scipy).
Labels: 0 background, 1..20 the classes, 255 ignored.
"""

import os

import numpy as np
import scipy.io

from pspnet_jax.data.builders import base

VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
SBD_URL = (
  'http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/'
  'semantic_contours/benchmark.tgz'
)
CLASS_NAMES = (
  'background',
  'aeroplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'diningtable',
  'dog',
  'horse',
  'motorbike',
  'person',
  'pottedplant',
  'sheep',
  'sofa',
  'train',
  'tvmonitor',
)
VOC = os.path.join('VOCdevkit', 'VOC2012')
SBD = os.path.join('benchmark_RELEASE', 'dataset')
INSTRUCTIONS = (
  f'Download {VOC_URL} and {SBD_URL} and unpack both into the manual dir, so '
  f'that it holds {VOC}/ and {SBD}/.'
)


def read_sbd_class_map(path: str) -> np.ndarray:
  """SBD cls/NAME.mat -> uint8 [H, W] class indices (GTcls.Segmentation)."""
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    segmentation = mat['GTcls'].Segmentation
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise base.BadExampleError(
      f'{path}: not an SBD class map (GTcls.Segmentation) ({e}). Unpack benchmark.tgz '
      'again, or drop the example with --skip-bad-examples.'
    ) from e
  return np.asarray(segmentation).astype(np.uint8)


class Voc2012Aug(base.SegmentationBuilder):
  """Pascal VOC 2012 + SBD, 21 classes."""

  DESCRIPTION = __doc__
  CLASS_NAMES = CLASS_NAMES
  BASE_SIZE = 512
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _roots(self, dl_manager) -> tuple[str, str]:
    """-> (the folder holding VOCdevkit/, the one holding benchmark_RELEASE/)."""
    if not self.manual_dir:
      return (
        os.fspath(dl_manager.download_and_extract(VOC_URL)),
        os.fspath(dl_manager.download_and_extract(SBD_URL)),
      )
    # The user chose to supply the files: never download behind them.
    for part in (VOC, SBD):
      if not os.path.isdir(os.path.join(self.manual_dir, part)):
        raise base.ManualDirError(
          f'{os.path.join(self.manual_dir, part)}/ is missing. {INSTRUCTIONS} (Or leave '
          'out --manual-dir to let TFDS download both.)'
        )
    return self.manual_dir, self.manual_dir

  def _split_generators(self, dl_manager):
    voc_root, sbd_root = self._roots(dl_manager)
    voc, sbd = os.path.join(voc_root, VOC), os.path.join(sbd_root, SBD)
    lists = {}
    for key, path in (
      ('voc_train', os.path.join(voc, 'ImageSets', 'Segmentation', 'train.txt')),
      ('voc_val', os.path.join(voc, 'ImageSets', 'Segmentation', 'val.txt')),
      ('sbd_train', os.path.join(sbd, 'train.txt')),
      ('sbd_val', os.path.join(sbd, 'val.txt')),
    ):
      if not os.path.isfile(path):
        raise base.ManualDirError(f'{path} is missing. {INSTRUCTIONS}')
      with open(path) as f:
        lists[key] = [line.strip() for line in f if line.strip()]
    val = sorted(set(lists['voc_val']))
    train_aug = sorted(
      (set(lists['voc_train']) | set(lists['sbd_train']) | set(lists['sbd_val'])) - set(val)
    )
    return self.generate_splits(
      {'train_aug': self._raws(voc, sbd, train_aug), 'val': self._raws(voc, sbd, val)}
    )

  def _raws(self, voc: str, sbd: str, names):
    for name in names:
      image = os.path.join(voc, 'JPEGImages', f'{name}.jpg')
      if not os.path.isfile(image):
        image = os.path.join(sbd, 'img', f'{name}.jpg')
      label = os.path.join(voc, 'SegmentationClass', f'{name}.png')
      if os.path.isfile(label):
        read_label = lambda p=label: base.read_file(p)
      else:
        label = os.path.join(sbd, 'cls', f'{name}.mat')
        read_label = lambda p=label: read_sbd_class_map(p)
      yield base.RawExample(
        key=name,
        id=name,
        image_name=image,
        label_name=label,
        read_image=lambda p=image: base.read_file(p),
        read_label=read_label,
      )
