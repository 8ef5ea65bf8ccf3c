"""mmsegmentation's recipe for its MobileNetV2 PSPNets (``configs/mobilenet_v2/
mobilenet-v2-d8_pspnet_*``: the ``pspnet_r101-d8`` base with the backbone swapped), shared
by ``{ade20k,cityscapes}_pspnet_mobilenetv2.py`` and, with the backbone swapped again, by
``{ade20k,cityscapes}_pspnet_shufflenetv2.py``.

mmseg: MobileNetV2-d8 from ``mmcls://mobilenet_v2``; PSPHead with 512-channel pyramid
branches, align_corners=False; SyncBN; SGD lr 0.01, momentum 0.9, weight decay 5e-4, poly
decay (power 0.9) per iteration to eta_min 1e-4, one learning rate for every parameter; aux
loss weight 0.4; RandomResize [0.5, 2.0] of (2048, 512) / (2048, 1024), RandomCrop
(cat_max_ratio 0.75), flip, PhotoMetricDistortion; ADE20K 4 GPUs x 4 images, crop 512x512,
160k iterations; Cityscapes 4 x 2, crop 512x1024, 80k iterations; whole-image evaluation,
single scale, no flip.

Where this differs from semseg's recipe (``semseg_recipe.py``): weight decay 5e-4 not
1e-4, no 10x head learning rate, no rotation or blur, a fixed iteration count, evaluation
whole-image without flip, mmseg's PhotoMetricDistortion on. Where it differs from mmseg (not
expressible here): the poly schedule decays to 0, not 1e-4; crops are square (Cityscapes
512x512, not 512x1024, at mmseg's batch 8) and an image smaller than the crop is padded on
every side with the mean, where mmseg pads bottom and right with 0; ADE20K is evaluated with
its long side resized to 512 (``eval.base_size``), where mmseg resizes the short side to 512.
Its training pipeline is mmseg's: RandomResize of the (2048, 512) / (2048, 1024) base scale
by [0.5, 2.0] (``augment.scale_base``), RandomCrop with ``cat_max_ratio`` 0.75, flip,
PhotoMetricDistortion.
"""

from configs.semseg_recipe import DatasetRecipe, base_config

DATASETS = {  # length: iterations
  'ade20k': DatasetRecipe(
    'ade20k', 'train', 'val', crop_size=512, length=160_000, base_size=512, resize_scale=(2048, 512)
  ),
  'cityscapes': DatasetRecipe(
    'cityscapes_trainid',
    'train',
    'val',
    crop_size=512,
    length=80_000,
    base_size=2048,
    batch=8,
    resize_scale=(2048, 1024),
  ),
}


def get_recipe(dataset: str, backbone: str = 'mobilenet_v2'):
  r = DATASETS[dataset]
  c = base_config()
  c.dataset.name, c.dataset.train_split, c.dataset.eval_split = (
    r.builder,
    r.train_split,
    r.eval_split,
  )
  c.model.backbone = backbone
  c.model.align_corners = False
  c.model.ppm_channels = 512
  c.optimizer.weight_decay = 5e-4
  c.optimizer.head_lr_multiplier = 1.0
  c.augment.crop_size = r.crop_size
  c.augment.rotate_min = c.augment.rotate_max = 0.0
  c.augment.blur = False
  c.augment.photometric = True
  c.augment.scale_base = r.resize_scale
  c.augment.cat_max_ratio = 0.75
  c.global_batch_size = r.batch
  c.num_steps = int(r.length)
  c.eval.mode = 'whole'
  c.eval.flip = False
  c.eval.crop_size, c.eval.base_size = r.crop_size, r.base_size
  return c
