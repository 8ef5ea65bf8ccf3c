"""cityscapes_trainid: Cityscapes fine annotations with the 19 training classes (trainIds).

TFDS's own `cityscapes` yields labelIds 0..33; this one maps them to trainIds 0..18 (the
rest 255) as semseg and the benchmark scripts do, and keeps each file's id
(city_sequence_frame) and the trainId -> labelId table in the metadata so predictions can
be written back in Cityscapes' own ids.

Raw data (needs an account, so never downloaded): from https://www.cityscapes-dataset.com/downloads/
unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into --manual-dir:
  leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
  gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
Splits: train (2,975), val (500).
"""

import os

from pspnet_jax.data.builders import base

# (labelId, trainId, name, colour) of the 19 evaluated classes; every other labelId -> 255.
CLASSES = (
  (7, 0, 'road', (128, 64, 128)),
  (8, 1, 'sidewalk', (244, 35, 232)),
  (11, 2, 'building', (70, 70, 70)),
  (12, 3, 'wall', (102, 102, 156)),
  (13, 4, 'fence', (190, 153, 153)),
  (17, 5, 'pole', (153, 153, 153)),
  (19, 6, 'traffic light', (250, 170, 30)),
  (20, 7, 'traffic sign', (220, 220, 0)),
  (21, 8, 'vegetation', (107, 142, 35)),
  (22, 9, 'terrain', (152, 251, 152)),
  (23, 10, 'sky', (70, 130, 180)),
  (24, 11, 'person', (220, 20, 60)),
  (25, 12, 'rider', (255, 0, 0)),
  (26, 13, 'car', (0, 0, 142)),
  (27, 14, 'truck', (0, 0, 70)),
  (28, 15, 'bus', (0, 60, 100)),
  (31, 16, 'train', (0, 80, 100)),
  (32, 17, 'motorcycle', (0, 0, 230)),
  (33, 18, 'bicycle', (119, 11, 32)),
)
LABEL_ID_TO_TRAIN_ID = {label_id: train_id for label_id, train_id, _, _ in CLASSES}
TRAIN_ID_TO_LABEL_ID = tuple(label_id for label_id, _, _, _ in CLASSES)
SPLITS = ('train', 'val')
INSTRUCTIONS = (
  'Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
  'https://www.cityscapes-dataset.com/downloads/ (free account) and unzip both into the '
  'manual dir, so that it holds leftImg8bit/{train,val}/ and gtFine/{train,val}/.'
)


class CityscapesTrainid(base.SegmentationBuilder):
  """Cityscapes fine, 19 trainId classes."""

  DESCRIPTION = __doc__
  CLASS_NAMES = tuple(name for _, _, name, _ in CLASSES)
  PALETTE = tuple(colour for _, _, _, colour in CLASSES)
  BASE_SIZE = 2048
  VALID_RAW_HINT = 'gtFine *_labelIds.png files hold labelIds 0..33'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def label_map(self):
    return base.label_lookup(LABEL_ID_TO_TRAIN_ID, range(34))

  def extra_metadata(self) -> dict:
    return {'train_id_to_label_id': list(TRAIN_ID_TO_LABEL_ID)}

  def _split_generators(self, dl_manager):
    del dl_manager  # Cityscapes needs a login: manual only
    root = self.require_manual_dir(needs='leftImg8bit/ and gtFine/', instructions=INSTRUCTIONS)
    raws = {}
    for split in SPLITS:
      for part in ('leftImg8bit', 'gtFine'):
        if not os.path.isdir(os.path.join(root, part, split)):
          raise base.ManualDirError(f'{os.path.join(root, part, split)} is missing. {INSTRUCTIONS}')
      raws[split] = self._raws(root, split)
    return self.generate_splits(raws)

  def _raws(self, root: str, split: str):
    image_dir = os.path.join(root, 'leftImg8bit', split)
    suffix = '_leftImg8bit.png'
    for city in sorted(os.listdir(image_dir)):
      for name in sorted(os.listdir(os.path.join(image_dir, city))):
        if not name.endswith(suffix):
          continue
        ident = name[: -len(suffix)]
        image = os.path.join(image_dir, city, name)
        label = os.path.join(root, 'gtFine', split, city, f'{ident}_gtFine_labelIds.png')
        yield base.RawExample(
          key=ident,
          id=ident,
          image_name=image,
          label_name=label,
          read_image=lambda p=image: base.read_file(p),
          read_label=lambda p=label: base.read_file(p),
        )
