"""What a running training shows: ``metrics.jsonl`` and TensorBoard events in the workdir,
and a progress bar on the console; process 0 only."""

from __future__ import annotations

import json
import os
import sys
import time

import jax


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch, when
  it is installed, only to accept its tensors (which training never passes); that import
  costs 2-4 s at every start of train.py. With torch not yet imported, it is hidden for the
  duration of this import, so tensorboardX takes the path it takes without torch."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # makes ``import torch`` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsLogger:
  """metrics.jsonl and TensorBoard event files in the workdir; process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.tb = None
    if not self.enabled:
      return
    self.file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      SummaryWriter = _import_summary_writer()
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    row = {'step': step, 'kind': kind, 'time': time.time(),
           **{k: v for k, v in values.items() if isinstance(v, (int, float, str))}}
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f'{kind}/{k}', v, step)

  def close(self):
    if self.enabled:
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
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                      file=sys.stdout, mininterval=1.0)

  def update(self, step: int, row: dict):
    if self.bar is None:
      return
    self.bar.update(step - self.last)
    self.last = step
    self.bar.set_postfix_str(
        f"ep {row['epoch']:.2f} loss {row['loss']:.4f} aux {row['aux_loss']:.4f} "
        f"lr {row.get('lr', float('nan')):.2e} {row['img_per_s']:.1f} img/s")

  def note(self, text: str):
    if self.bar is not None:
      self.bar.write(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()
