"""PSPNet with mmseg's dilated MobileNetV2 on Cityscapes val, mmsegmentation's recipe
(``configs/mmseg_mobilenet_v2_recipe.py`` says where it differs from semseg's and mmseg's).

Prepare the data, port the ImageNet initialisation, train on 4+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare cityscapes_trainid --manual-dir DIR --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port mobilenet_v2_batch256_imagenet.pth --num-classes 19 --out runs/init/mobilenet_v2
  python train.py --config configs/cityscapes_pspnet_mobilenetv2.py \
      --workdir runs/cityscapes_pspnet_mobilenetv2 --config.init_checkpoint=runs/init/mobilenet_v2
  python eval.py --config configs/cityscapes_pspnet_mobilenetv2.py \
      --workdir runs/cityscapes_pspnet_mobilenetv2

Or evaluate mmseg's released model
(pspnet_m-v2-d8_512x1024_80k_cityscapes_20200825_124817-19e81d51.pth) after
``python -m pspnet_jax.port FILE --out DIR``.

Published (mmseg, mIoU %), Cityscapes val, PSPNet M-V2-D8 512x1024 80k: 70.23 (single scale).
"""

from configs.mmseg_mobilenet_v2_recipe import get_recipe


def get_config():
  return get_recipe('cityscapes')
