"""The authors' (semseg) training and evaluation recipe, shared by the dataset configs.

Batch 16 in total with synchronised BN, SGD lr 0.01, momentum 0.9, weight decay 1e-4 on all
parameters, poly decay (power 0.9) per iteration, 10x lr on ppm/cls/aux, aux loss weight
0.4, ignore label 255; augmentation scale [0.5, 2.0], rotate [-10, 10], blur, flip, crop.
Evaluation: sliding window with stride 2/3 of the crop, flip, base size per dataset.
"""

import dataclasses

import ml_collections

from pspnet_jax.data import AugmentConfig
from pspnet_jax.evaluation import EvalConfig
from pspnet_jax.train import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DatasetRecipe:
  """What a recipe sets per dataset."""

  builder: str  # the TFDS builder (pspnet_jax.data)
  train_split: str
  eval_split: str
  crop_size: int  # training crop and evaluation window
  length: float  # epochs (semseg) or iterations (mmseg)
  base_size: int  # evaluation: the long side at scale 1.0
  batch: int = 16  # global batch
  resize_scale: tuple[int, int] | tuple[()] = ()  # mmseg's RandomResize base (long, short)


DATASETS = {
  'ade20k': DatasetRecipe('ade20k', 'train', 'val', crop_size=473, length=100, base_size=512),
  'voc2012': DatasetRecipe(
    'voc2012_aug', 'train_aug', 'val', crop_size=473, length=50, base_size=512
  ),
  'cityscapes': DatasetRecipe(
    'cityscapes_trainid', 'train', 'val', crop_size=713, length=200, base_size=2048
  ),
}


def section(schema) -> ml_collections.ConfigDict:
  """A config section holding every field of the dataclass ``schema`` with its default."""
  defaults = schema()
  return ml_collections.ConfigDict(
    {f.name: getattr(defaults, f.name) for f in dataclasses.fields(schema)}
  )


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with the semseg defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(
    dict(
      name='',
      data_dir='~/tensorflow_datasets',
      manual_dir='',
      train_split='train',
      eval_split='val',
      builder_kwargs=ml_collections.ConfigDict(),
      # On resume: 'exact' (the batches the run would have drawn next; refused if the batch
      # size, seed, split or augmentation changed), 'restart' (this run's data order from the
      # checkpoint's epoch position), 'auto' (exact if unchanged, else restart, said in a line).
      resume_data='auto',
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      depth=50,
      stem='deep',
      output_stride=8,
      contract_dilation=False,
      align_corners=True,
      bins=(1, 2, 3, 6),
      base_width=64,
      head_channels=512,
      aux_channels=256,
      dropout=0.1,
      dtype='float32',
      backbone='resnet',
      width_mult=1.0,
      ppm_channels=0,
    )
  )
  # Augmentation, optimizer and evaluation: every field of the dataclass is a key, and its
  # default is the dataclass's (semseg's recipe; the fields' comments say what each does).
  c.augment = section(AugmentConfig)
  c.optimizer = section(OptimizerConfig)
  c.global_batch_size = 16
  c.grad_accum_steps = 1
  c.num_epochs = 100.0
  c.num_steps = 0  # > 0 overrides num_epochs
  c.aux_weight = 0.4
  # The loss is taken at the logits' resolution, this many output rows at a time
  # (pspnet_jax.train.loss): a block's float32 logits, B x rows x crop x classes per device,
  # stay in on-chip memory (VMEM) on TPU v5e and v6e at 32 (ADE20K, 4 images of 473 a chip:
  # 36 MB; the audit of `python -m pspnet_jax.aot --breakdown` shows where they live).
  c.loss_block_rows = 32
  # A step whose loss exceeds this many times its recent level (the median of the last 50
  # steps, at least log(classes)) marks a divergence, as a NaN does: the run stops, keeping
  # only checkpoints from before it (pspnet_jax.train.monitor.DivergenceWatch). 0: NaN only.
  c.divergence_factor = 10.0
  c.init_checkpoint = ''  # a model directory from `python -m pspnet_jax.port`
  c.init_backbone_only = False  # True: take only its backbone (e.g. other classes)
  # The convolution in programs lowered for the CPU (pspnet_jax.ops.backend): backend 'auto'
  # (this project's CPU kernels) or 'xla'; weight_gradient 'auto' or one of 'xla', 'taps',
  # 'shifted' for every layer. PSPNET_CONV / PSPNET_CONV_WGRAD override them; a workdir's
  # config.json records what was in effect.
  c.conv = ml_collections.ConfigDict(dict(backend='auto', weight_gradient='auto'))
  # Knowledge distillation (pspnet_jax.train.distill): a frozen teacher, a model directory
  # with the same classes; '' = off. loss 'cwd' (channel-wise, Shu et al. 2021) or 'kl'
  # (pixel-wise); tau and weight as mmrazor's CWD PSPNet R101 -> R18 Cityscapes config; aux:
  # distil the aux head too.
  c.distill = ml_collections.ConfigDict(
    dict(teacher='', loss='cwd', tau=1.0, weight=5.0, aux=False)
  )
  c.worker_count = 4
  c.log_every_steps = 20
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 5000  # short whole-image validation during training; 0: off
  c.eval_num_examples = 200
  # Final evaluation after training (eval.py runs the full protocol with these settings);
  # window_batch 0 is one window per local device.
  c.eval = section(EvalConfig)
  return c


def get_recipe(dataset: str, depth: int) -> ml_collections.ConfigDict:
  r = DATASETS[dataset]
  c = base_config()
  c.dataset.name, c.dataset.train_split, c.dataset.eval_split = (
    r.builder,
    r.train_split,
    r.eval_split,
  )
  c.model.depth = depth
  c.augment.crop_size = r.crop_size
  c.num_epochs = float(r.length)
  c.global_batch_size = r.batch
  c.eval.crop_size, c.eval.base_size = r.crop_size, r.base_size
  return c
