"""The embedded default: a small PSPNet (ResNet-18 backbone at 1/4 width) trained and
evaluated on the built-in synthetic_shapes dataset, through exactly the same builder ->
input pipeline -> train step -> evaluation path as the real datasets. A few minutes on 2
CPU cores:

  python train.py --config configs/synthetic.py --workdir runs/synthetic

Target: validation mIoU >= 0.85 (the shapes are easy; this checks the machinery learns).
"""

from configs.semseg_recipe import base_config


def get_config():
  c = base_config()
  c.dataset.name = 'synthetic_shapes'
  c.dataset.data_dir = 'runs/tfds'
  c.dataset.train_split, c.dataset.eval_split = 'train', 'val'
  c.dataset.builder_kwargs.image_size = 96
  c.dataset.builder_kwargs.num_train = 512
  c.dataset.builder_kwargs.num_val = 64
  c.model.depth = 18
  c.model.base_width = 16
  c.model.head_channels = 64
  c.model.aux_channels = 32
  c.augment.crop_size = 96
  c.augment.scale_min, c.augment.scale_max = 0.75, 1.5
  c.optimizer.learning_rate = 0.02
  c.global_batch_size = 16
  c.num_steps = 600
  c.worker_count = 0
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 300
  c.eval_num_examples = 32
  c.eval.mode = 'whole'
  c.eval.crop_size = 96
  c.eval.base_size = 96
  return c
