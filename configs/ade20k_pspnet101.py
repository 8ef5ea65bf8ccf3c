"""PSPNet-101 on ADE20K val, the authors' (semseg) recipe.

Prepare the data, port the ImageNet initialisation, train on 8+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare ade20k --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port resnet101_v2.pth --layout semseg-imagenet --out runs/init/resnet101_v2
  python train.py --config configs/ade20k_pspnet101.py --workdir runs/ade20k_pspnet101 \
      --config.init_checkpoint=runs/init/resnet101_v2
  python eval.py --config configs/ade20k_pspnet101.py --workdir runs/ade20k_pspnet101
  python eval.py --config configs/ade20k_pspnet101.py --workdir runs/ade20k_pspnet101 \
      "--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"

Published (semseg, mIoU / mAcc / allAcc %), ADE20K val, PSPNet101:
  single scale + flip: 43.10 / 53.75 / 81.07
  multi scale + flip:  44.15 / 54.26 / 81.72
"""

from configs.semseg_recipe import get_recipe


def get_config():
  return get_recipe('ade20k', 101)
