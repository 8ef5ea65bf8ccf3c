"""Distillation demo on the built-in synthetic dataset: a small student (ResNet-18 at 1/8
width, a 32-channel head) learns from the model that ``make run`` trains (the teacher:
ResNet-18 at 1/4 width, validation mIoU ~0.88), by channel-wise distillation
(``pspnet_jax.train.distill``). First ``make run`` (it leaves the teacher in
runs/synthetic), then:

  python train.py --config configs/synthetic_distill.py --workdir runs/synthetic_distill

The same student without the teacher, to compare (benchmarks/distill.py runs both over
seeds): add ``--config.distill.teacher=`` (empty: off).
"""

from configs.synthetic import get_config as synthetic


def get_config():
  c = synthetic()
  c.model.base_width = 8
  c.model.head_channels = 32
  c.model.aux_channels = 16
  c.num_steps = 300
  c.eval_every_steps = 0
  c.distill.teacher = 'runs/synthetic'  # make run's workdir: its newest checkpoint
  return c
