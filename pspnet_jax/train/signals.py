"""Signals in the training loop: SIGTERM as a preemption notice (save, then exit cleanly),
and a fault-injection hook that tests use to kill the loop at a chosen step."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def maybe_inject_signal(step: int):
  """Fault injection for tests: ``PSPNET_SIGNAL_AT_STEP=7:KILL`` (or ``:TERM``) sends
  that signal to this process right after step 7, wherever the asynchronous checkpoint
  writer is. Tests use it because an outside signal races a fast machine."""
  spec = os.environ.get('PSPNET_SIGNAL_AT_STEP')
  if spec:
    at, name = spec.split(':')
    if step == int(at):
      os.kill(os.getpid(), getattr(signal, 'SIG' + name))
