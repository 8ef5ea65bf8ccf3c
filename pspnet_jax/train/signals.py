"""Signals in the training loop: SIGTERM (a preemption notice) and SIGINT (Ctrl-C) ask the
loop to save at the next step boundary and stop; a second SIGINT stops at once."""

from __future__ import annotations

import os
import signal
import sys

from pspnet_jax.errors import EXIT_INTERRUPTED
from pspnet_jax.mesh import per_process


class StopRequest:
  """SIGTERM and SIGINT set ``requested`` (the signal's name); the loop saves at the next
  step boundary and stops. A second SIGINT, for a user who will not wait for the save,
  ends the process at once with one line and exit status 130: the checkpoint being
  written, if any, is left half-written under orbax's temporary name, which the next start
  removes (``checkpoint.TrainCheckpointer``); the workdir lock is taken over (its owner gone)."""

  def __init__(self, workdir: str):
    self.requested: str | None = None
    self._workdir = workdir
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested == 'SIGINT' and name == 'SIGINT':
      print(
        f'\ninterrupted again: stopped at once; {self._workdir} keeps its earlier checkpoints '
        '(run the same command to resume from the newest)',
        file=sys.stderr,
        flush=True,
      )
      os._exit(EXIT_INTERRUPTED)
    if self.requested is None and name == 'SIGINT':
      print(
        '\ninterrupt: saving a checkpoint at this step, then stopping (Ctrl-C again to stop '
        'at once)',
        file=sys.stderr,
        flush=True,
      )
    self.requested = self.requested or name

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)

  def any_process(self) -> bool:
    """Whether any process was asked to stop; then every process takes the request's
    kind (SIGINT over SIGTERM), so that all save, say and exit alike. A collective when
    there are several processes."""
    kinds = (None, 'SIGTERM', 'SIGINT')
    asked = per_process(kinds.index(self.requested))
    self.requested = kinds[int(asked.max())] or self.requested
    return self.requested is not None
