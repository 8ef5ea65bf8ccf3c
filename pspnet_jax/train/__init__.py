"""Training: the train step (loss and update), the optax recipe, and the loop around them
(``train.py``'s body).

  from pspnet_jax.train import train_and_evaluate
  metrics = train_and_evaluate(config, workdir)      # config: configs/*.py's ConfigDict
"""

from pspnet_jax.train.loop import TrainingDiverged, TrainingInterrupted, train_and_evaluate
from pspnet_jax.train.loss import cross_entropy, upsampled_cross_entropy
from pspnet_jax.train.optimizer import (
  OptimizerConfig,
  make_optimizer,
  param_groups,
  poly_schedule,
  schedules,
)
from pspnet_jax.train.step import make_train_step

__all__ = [
  'OptimizerConfig',
  'TrainingDiverged',
  'TrainingInterrupted',
  'cross_entropy',
  'make_optimizer',
  'make_train_step',
  'param_groups',
  'poly_schedule',
  'schedules',
  'train_and_evaluate',
  'upsampled_cross_entropy',
]
