"""What a running training shows: ``metrics.jsonl`` and TensorBoard events in the workdir,
and a progress bar on the console (process 0 only); and where it diverged."""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
import time

import jax

from pspnet_jax import _compat


class MetricsLogger:
  """metrics.jsonl and TensorBoard event files in the workdir; process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.tb = None
    if not self.enabled:
      return
    self.file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      SummaryWriter = _compat.import_summary_writer()
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    row = {
      'step': step,
      'kind': kind,
      'time': time.time(),
      **{k: v for k, v in values.items() if isinstance(v, (int, float, str))},
    }
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f'{kind}/{k}', v, step)

  def close(self):
    if self.enabled and not self.file.closed:
      self.file.close()
      if self.tb is not None:
        self.tb.close()


class ProgressBar:
  """A tqdm bar on process 0 with step, epoch, loss, aux loss, lr, img/s and ETA."""

  def __init__(self, enabled: bool, start: int, total: int):
    self.bar = None
    self.last = start
    if enabled:
      from tqdm import tqdm

      self.bar = tqdm(
        total=total,
        initial=start,
        unit='step',
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=1.0,
      )

  def update(self, step: int, row: dict):
    if self.bar is None:
      return
    self.bar.update(step - self.last)
    self.last = step
    self.bar.set_postfix_str(
      f'ep {row["epoch"]:.2f} loss {row["loss"]:.4f} aux {row["aux_loss"]:.4f} '
      f'lr {row.get("lr", float("nan")):.2e} {row["img_per_s"]:.1f} img/s'
    )

  def note(self, text: str):
    if self.bar is not None:
      self.bar.write(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class DivergenceWatch:
  """Finds the step where a run diverged: the first whose loss or gradient norm is not
  finite, or whose loss jumps above ``factor`` x the larger of the median of the last
  ``window`` losses and log(num_classes) (the loss of a uniform guess, a floor for runs
  whose loss is near 0). A loss spike precedes the NaN by a step or more (lr 1e8: 1.4 at
  step 1, 1e16 at step 2, NaN at step 3), and the weights that produced it are already
  bad: a checkpoint kept from then would diverge again when resumed. ``factor`` 0 watches
  only for non-finite values."""

  def __init__(self, factor: float, num_classes: int, window: int = 50):
    self.factor, self.floor = float(factor), math.log(max(num_classes, 2))
    self.recent = collections.deque(maxlen=window)

  def check(self, step: int, row: dict) -> str | None:
    """What diverged at ``step`` (one phrase), or None; ``row`` holds ``loss``, ``grad_norm``."""
    for key in ('loss', 'grad_norm'):
      value = float(row[key])
      if not math.isfinite(value):
        return f'{key.replace("_", " ")} is {value} at step {step}'
    loss = float(row['loss'])
    reference = max(statistics.median(self.recent), self.floor) if self.recent else self.floor
    if self.factor and loss > self.factor * reference:
      return (
        f'loss jumped to {loss:.4g} at step {step}, over {self.factor:g}x its recent level '
        f'{reference:.4g}'
      )
    self.recent.append(loss)
    return None
