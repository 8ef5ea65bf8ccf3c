"""PSPNet-101 on Cityscapes val, the authors' (semseg) recipe.

Prepare the data, port the ImageNet initialisation, train on 8+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare cityscapes_trainid --manual-dir DIR --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port resnet101_v2.pth --layout semseg-imagenet --out runs/init/resnet101_v2
  python train.py --config configs/cityscapes_pspnet101.py --workdir runs/cityscapes_pspnet101 \
      --config.init_checkpoint=runs/init/resnet101_v2
  python eval.py --config configs/cityscapes_pspnet101.py --workdir runs/cityscapes_pspnet101
  python eval.py --config configs/cityscapes_pspnet101.py --workdir runs/cityscapes_pspnet101 \
      "--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"

Published (semseg, mIoU / mAcc / allAcc %), Cityscapes val, PSPNet101:
  single scale + flip: 78.63 / 85.77 / 96.14
  multi scale + flip:  79.29 / 85.91 / 96.38
"""

from configs.semseg_recipe import get_recipe


def get_config():
  return get_recipe('cityscapes', 101)
