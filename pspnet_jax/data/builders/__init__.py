"""TFDS builders, one per raw dataset layout; each prepares array_record files."""

from pspnet_jax.data.builders.ade20k import Ade20k
from pspnet_jax.data.builders.base import BadExampleError as BadExampleError
from pspnet_jax.data.builders.base import ManualDirError as ManualDirError
from pspnet_jax.data.builders.base import SegmentationBuilder
from pspnet_jax.data.builders.cityscapes_trainid import CityscapesTrainid
from pspnet_jax.data.builders.segmentation_folder import SegmentationFolder
from pspnet_jax.data.builders.synthetic_shapes import SyntheticShapes
from pspnet_jax.data.builders.voc2012_aug import Voc2012Aug

BUILDERS: dict[str, type[SegmentationBuilder]] = {
  'ade20k': Ade20k,
  'cityscapes_trainid': CityscapesTrainid,
  'segmentation_folder': SegmentationFolder,
  'synthetic_shapes': SyntheticShapes,
  'voc2012_aug': Voc2012Aug,
}
