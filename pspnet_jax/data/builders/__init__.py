"""TFDS builders, one per raw dataset layout; each prepares array_record files."""

from pspnet_jax.data.builders.base import BadExampleError, ManualDirError, SegmentationBuilder
from pspnet_jax.data.builders.synthetic_shapes import SyntheticShapes

BUILDERS: dict[str, type[SegmentationBuilder]] = {
    'synthetic_shapes': SyntheticShapes,
}
