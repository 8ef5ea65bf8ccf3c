"""PSPNet-50 on Cityscapes val, the authors' (semseg) recipe.

Prepare the data, port the ImageNet initialisation, train on 8+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare cityscapes_trainid --manual-dir DIR --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port resnet50_v2.pth --layout semseg-imagenet --out runs/init/resnet50_v2
  python train.py --config configs/cityscapes_pspnet50.py --workdir runs/cityscapes_pspnet50 \
      --config.init_checkpoint=runs/init/resnet50_v2
  python eval.py --config configs/cityscapes_pspnet50.py --workdir runs/cityscapes_pspnet50
  python eval.py --config configs/cityscapes_pspnet50.py --workdir runs/cityscapes_pspnet50 \
      "--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"

Published (semseg, mIoU / mAcc / allAcc %), Cityscapes val, PSPNet50:
  single scale + flip: 77.30 / 84.31 / 95.97
  multi scale + flip:  78.38 / 84.86 / 96.17
"""

from configs.semseg_recipe import get_recipe


def get_config():
  return get_recipe('cityscapes', 50)
