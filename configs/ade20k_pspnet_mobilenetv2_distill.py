"""PSPNet-MobileNetV2 (the student, ``configs/ade20k_pspnet_mobilenetv2.py``: mmseg's recipe)
distilled from PSPNet-101 (the teacher: semseg's released ADE20K model, 43.10 / 44.15 mIoU
single / multi-scale, ported; docs/model_zoo.md), by channel-wise distillation on the logits
before the final upsampling with mmrazor's settings for PSPNet (tau 1, weight 5; Shu et al.,
ICCV 2021).

  python -m pspnet_jax.port train_epoch_100.pth --out runs/teachers/ade20k_pspnet101
  python -m pspnet_jax.port mobilenet_v2_batch256_imagenet.pth --out runs/init/mobilenet_v2
  python train.py --config configs/ade20k_pspnet_mobilenetv2_distill.py \
      --workdir runs/ade20k_pspnet_mobilenetv2_distill \
      --config.init_checkpoint=runs/init/mobilenet_v2

The teacher runs in the same compiled step (inference mode, its own normalisation, the
student's compute dtype) and adds its forward pass to each step; ``python -m pspnet_jax.aot
--config configs/ade20k_pspnet_mobilenetv2_distill.py --program train`` gives the step's
figures on a TPU slice without one (it reads only the teacher's model_config.json). Any model
directory with ADE20K's 150 classes can teach: ``--config.distill.teacher=DIR``.
"""

from configs.ade20k_pspnet_mobilenetv2 import get_config as student


def get_config():
  c = student()
  c.distill.teacher = 'runs/teachers/ade20k_pspnet101'
  c.distill.loss = 'cwd'
  c.distill.tau = 1.0
  c.distill.weight = 5.0
  return c
