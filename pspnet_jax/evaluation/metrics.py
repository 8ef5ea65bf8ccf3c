"""Semantic segmentation metrics from one confusion matrix accumulated over a whole set.

As in semseg (``tool/test.py``, ``cal_acc``), pixels whose label is the ignore label (255)
are dropped before counting, and the scores come from counts summed over the *set*, not
averaged per image.

Counting happens on device. One call of ``confusion_matrix`` counts at most 2**31 - 1
pixels (an int32 per cell cannot overflow: one Cityscapes image has 2**21 pixels), but a
whole set does not fit: Cityscapes train is 2975 x 2**21 = 6.2e9 pixels, and 64-bit integers
in JAX need the process-wide ``jax_enable_x64``. The set-level accumulator is therefore two
uint32 words per cell (low and high, ``[2, C, C]`` uint32), exact up to 2**64 pixels, added
to with an explicit carry (``add_confusion``); it is reduced to one NumPy int64 matrix once,
at the end (``confusion_to_numpy``).

Classes absent from both the prediction and the truth of the whole set have an undefined
IoU (0 / 0). semseg computes ``intersection / (union + 1e-10)`` and takes ``np.mean`` over
*all* classes, so such a class enters its mIoU as 0 (and a class with no truth pixels enters
its mAcc as 0). On full validation sets every class occurs in the truth and the two rules
agree; on subsets (quick validation during training, a few images) semseg's rule reports
scores that drop with every class the subset happens to miss. ``segmentation_metrics``
therefore excludes undefined values from the means by default (``absent='exclude'``, the
rule of mmsegmentation's ``nanmean``): the mIoU runs over classes present in the truth or
the prediction, the mAcc over classes present in the truth. ``absent='zero'`` reproduces
semseg's numbers exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def confusion_matrix(
  pred: jax.Array, label: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
  """Counts of (truth, prediction) pairs; jit-able, runs on device.

  pred: [...] integer class ids in ``[0, num_classes)``; label: [...] same shape, integer
  class ids or ``ignore_label``. Labels outside ``[0, num_classes)`` that are not the ignore
  label are not counted either (the data pipeline guarantees there are none;
  ``Evaluator.evaluate_dataset`` checks at its boundary).
  Returns [num_classes, num_classes] int32: row = truth, column = prediction.
  """
  if pred.shape != label.shape:
    raise ValueError(f'prediction shape {pred.shape} != label shape {label.shape}')
  if pred.size >= 2**31:
    raise ValueError(f'{pred.size} pixels in one call could overflow int32 counts; split it')
  label = label.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  valid = (label != ignore_label) & (label >= 0) & (label < num_classes)
  index = jnp.where(valid, label * num_classes + pred, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def empty_confusion(num_classes: int) -> jax.Array:
  """A set-level accumulator: [2, C, C] uint32, low and high words of 64-bit counts."""
  return jnp.zeros((2, num_classes, num_classes), jnp.uint32)


def add_confusion(acc: jax.Array, counts: jax.Array) -> jax.Array:
  """acc: [2, C, C] uint32 (``empty_confusion``); counts: [C, C] int32 >= 0. Jit-able."""
  low = acc[0] + counts.astype(jnp.uint32)  # wraps modulo 2**32
  carry = (low < acc[0]).astype(jnp.uint32)
  return jnp.stack([low, acc[1] + carry])


def confusion_to_numpy(acc) -> np.ndarray:
  """[2, C, C] uint32 accumulator (or a plain [C, C] matrix) -> [C, C] int64 on the host."""
  acc = np.asarray(acc)
  if acc.ndim == 3:
    return (acc[1].astype(np.int64) << 32) + acc[0].astype(np.int64)
  return acc.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  out = np.full(num.shape, np.nan)
  np.divide(num, den, out=out, where=den > 0)
  return out


def _mean(values: np.ndarray, absent: str) -> float:
  if absent == 'zero':
    return float(np.mean(np.nan_to_num(values, nan=0.0)))
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else float('nan')


def segmentation_metrics(
  confusion, class_names: Sequence[str] | None = None, absent: str = 'exclude'
) -> dict:
  """Scores from a confusion matrix (rows truth, columns prediction; any integer dtype,
  or a ``[2, C, C]`` accumulator).

  Returns ``miou`` (mean IoU), ``macc`` (mean class recall), ``allacc`` (pixel accuracy),
  ``fwiou`` (IoU weighted by truth frequency), all in [0, 1], and ``per_class``: a list of
  ``{name, iou, precision, recall, f1}`` with ``None`` where a value is undefined (0 / 0).
  ``absent``: ``'exclude'`` leaves undefined per-class values out of the means;
  ``'zero'`` counts them as 0, as semseg's ``cal_acc`` does (see the module docstring).
  """
  if absent not in ('exclude', 'zero'):
    raise ValueError(f"absent must be 'exclude' or 'zero', got {absent!r}")
  conf = confusion_to_numpy(confusion).astype(np.float64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f'confusion matrix must be square [C, C], got shape {conf.shape}')
  num_classes = conf.shape[0]
  if class_names is None:
    class_names = [f'class_{i}' for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
  tp = np.diag(conf)
  truth = conf.sum(axis=1)
  predicted = conf.sum(axis=0)
  union = truth + predicted - tp
  iou = _ratio(tp, union)
  precision = _ratio(tp, predicted)
  recall = _ratio(tp, truth)
  f1 = _ratio(2 * tp, truth + predicted)
  total = truth.sum()
  # Frequency weights are zero for classes without truth pixels, whatever their IoU.
  fwiou = float(np.sum((truth / total) * np.nan_to_num(iou))) if total > 0 else float('nan')

  def value(x):
    return None if np.isnan(x) else float(x)

  return {
    'miou': _mean(iou, absent),
    'macc': _mean(recall, absent),
    'allacc': float(tp.sum() / total) if total > 0 else float('nan'),
    'fwiou': fwiou,
    'per_class': [
      {
        'name': str(n),
        'iou': value(iou[i]),
        'precision': value(precision[i]),
        'recall': value(recall[i]),
        'f1': value(f1[i]),
      }
      for i, n in enumerate(class_names)
    ],
  }
