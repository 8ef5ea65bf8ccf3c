"""PSPNet-50 on ADE20K val, the authors' (semseg) recipe.

Prepare the data, port the ImageNet initialisation, train on 8+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare ade20k --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port resnet50_v2.pth --layout semseg-imagenet --out runs/init/resnet50_v2
  python train.py --config configs/ade20k_pspnet50.py --workdir runs/ade20k_pspnet50 \
      --config.init_checkpoint=runs/init/resnet50_v2
  python eval.py --config configs/ade20k_pspnet50.py --workdir runs/ade20k_pspnet50
  python eval.py --config configs/ade20k_pspnet50.py --workdir runs/ade20k_pspnet50 \
      "--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"

Published (semseg, mIoU / mAcc / allAcc %), ADE20K val, PSPNet50:
  single scale + flip: 41.89 / 52.27 / 80.39
  multi scale + flip:  42.84 / 52.66 / 81.06
"""

from configs.semseg_recipe import get_recipe


def get_config():
  return get_recipe('ade20k', 50)
