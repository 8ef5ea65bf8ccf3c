"""PSPNet with a dilated torchvision ShuffleNetV2 x1.0 on ADE20K val, trained with mmseg's
MobileNetV2 recipe with the backbone swapped (``configs/mmseg_mobilenet_v2_recipe.py``
says where that recipe differs from semseg's and mmseg's). The backbone's widths and
dilation: ``pspnet_jax/models/shufflenet_v2.py``; ``--config.model.width_mult=0.5`` (or
1.5, 2.0) for another width, with the ImageNet file of that width.

Prepare the data, port torchvision's ImageNet initialisation (``torchvision.models.
shufflenet_v2_x1_0(weights='IMAGENET1K_V1').state_dict()`` saved with ``torch.save``), train
on 4+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare ade20k --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port shufflenetv2_x1.pth --out runs/init/shufflenet_v2_x1.0
  python train.py --config configs/ade20k_pspnet_shufflenetv2.py \
      --workdir runs/ade20k_pspnet_shufflenetv2 --config.init_checkpoint=runs/init/shufflenet_v2_x1.0
  python eval.py --config configs/ade20k_pspnet_shufflenetv2.py --workdir runs/ade20k_pspnet_shufflenetv2

Published: none. Neither the PSPNet authors nor mmsegmentation released a ShuffleNetV2
PSPNet; the nearest published figure is mmseg's PSPNet M-V2-D8 512x512 160k, 29.68 mIoU
(``ade20k_pspnet_mobilenetv2.py``), which this recipe otherwise matches.
"""

from configs.mmseg_mobilenet_v2_recipe import get_recipe


def get_config():
  c = get_recipe('ade20k', backbone='shufflenet_v2')
  c.model.width_mult = 1.0
  return c
