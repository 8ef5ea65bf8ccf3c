"""PSPNet-50 on VOC2012 val, the authors' (semseg) recipe.

Prepare the data, port the ImageNet initialisation, train on 8+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare voc2012_aug --manual-dir DIR --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port resnet50_v2.pth --layout semseg-imagenet --out runs/init/resnet50_v2
  python train.py --config configs/voc2012_pspnet50.py --workdir runs/voc2012_pspnet50 \
      --config.init_checkpoint=runs/init/resnet50_v2
  python eval.py --config configs/voc2012_pspnet50.py --workdir runs/voc2012_pspnet50
  python eval.py --config configs/voc2012_pspnet50.py --workdir runs/voc2012_pspnet50 \
      "--config.eval.scales=(0.5,0.75,1.0,1.25,1.5,1.75)"

Published (semseg, mIoU / mAcc / allAcc %), VOC2012 val, PSPNet50:
  single scale + flip: 77.05 / 85.13 / 94.89
  multi scale + flip:  78.02 / 85.80 / 95.13
"""

from configs.semseg_recipe import get_recipe


def get_config():
  return get_recipe('voc2012', 50)
