"""Datasets for PSPNet: TFDS builders (array_record, no TensorFlow), evaluation sources and
the augmented, sharded, resumable training pipeline.

  info = prepare('synthetic_shapes', data_dir)          # once; or python -m pspnet_jax.data.prepare
  loader = train_loader('synthetic_shapes', 'train', data_dir, global_batch_size=16,
                        augment=AugmentConfig(crop_size=97), seed=0)
  batch = next(loader)  # {'image': float32 [16, 97, 97, 3], 'label': int32 [16, 97, 97]}
"""

from pspnet_jax.data.builders import BUILDERS, BadExampleError, ManualDirError
from pspnet_jax.data.datasets import DatasetInfo, dataset_info, eval_source, prepare
from pspnet_jax.data.input_pipeline import TrainLoader, steps_per_epoch, train_loader
from pspnet_jax.data.transforms import AugmentConfig, augment

__all__ = [
  'AugmentConfig',
  'BUILDERS',
  'BadExampleError',
  'DatasetInfo',
  'ManualDirError',
  'TrainLoader',
  'augment',
  'dataset_info',
  'eval_source',
  'prepare',
  'steps_per_epoch',
  'train_loader',
]
