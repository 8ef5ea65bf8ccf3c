"""PSPNet with mmseg's dilated MobileNetV2 on ADE20K val, mmsegmentation's recipe
(``configs/mmseg_mobilenet_v2_recipe.py`` says where it differs from semseg's and mmseg's).

Prepare the data, port the ImageNet initialisation, train on 4+ accelerators, evaluate:

  python -m pspnet_jax.data.prepare ade20k --data-dir ~/tensorflow_datasets
  python -m pspnet_jax.port mobilenet_v2_batch256_imagenet.pth --out runs/init/mobilenet_v2
  python train.py --config configs/ade20k_pspnet_mobilenetv2.py \
      --workdir runs/ade20k_pspnet_mobilenetv2 --config.init_checkpoint=runs/init/mobilenet_v2
  python eval.py --config configs/ade20k_pspnet_mobilenetv2.py --workdir runs/ade20k_pspnet_mobilenetv2

Or evaluate mmseg's released model (pspnet_m-v2-d8_512x512_160k_ade20k_20200825_214953-f5942f7a.pth)
after ``python -m pspnet_jax.port FILE --out DIR``.

Published (mmseg, mIoU %), ADE20K val, PSPNet M-V2-D8 512x512 160k: 29.68 (single scale).
"""

from configs.mmseg_mobilenet_v2_recipe import get_recipe


def get_config():
  return get_recipe('ade20k')
