"""Evaluation: semseg's test protocol compiled (``protocol``), a split evaluated over every
process (``dataset``), the metrics of a confusion matrix (``metrics``), results and
predictions on disk (``outputs``), the job behind ``eval.py`` (``job``) and the ``predict``
command.

  from pspnet_jax.evaluation import EvalConfig, Evaluator, MULTI_SCALES
  ev = Evaluator(model, EvalConfig(mode='slide', scales=MULTI_SCALES))
  confusion, n, seconds = ev.evaluate_dataset(examples)
"""

from pspnet_jax.evaluation.dataset import evaluate, image_cost, process_shares
from pspnet_jax.evaluation.job import evaluate_checkpoint
from pspnet_jax.evaluation.metrics import confusion_matrix, segmentation_metrics
from pspnet_jax.evaluation.outputs import write_eval_outputs, write_prediction
from pspnet_jax.evaluation.protocol import (
  MULTI_SCALES,
  SINGLE_SCALE,
  EvalConfig,
  Evaluator,
  resized_size,
  window_starts,
)

__all__ = [
  'EvalConfig',
  'Evaluator',
  'MULTI_SCALES',
  'SINGLE_SCALE',
  'confusion_matrix',
  'evaluate',
  'evaluate_checkpoint',
  'image_cost',
  'process_shares',
  'resized_size',
  'segmentation_metrics',
  'window_starts',
  'write_eval_outputs',
  'write_prediction',
]
