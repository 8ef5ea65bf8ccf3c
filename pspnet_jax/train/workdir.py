"""A training workdir belongs to one run at a time: ``WORKDIR/.lock`` names the process
that holds it (host, pid, start time). A second run on the same workdir is refused with
one line naming the holder; the file is removed when the run ends, and taken over, saying
so, when its holder is gone (a ``kill -9``, a crash).

Only process 0 of a job takes the lock (the job's other processes share its workdir on a
shared filesystem); it tells them whether it got it, so every process of a refused job
stops. The file is created with ``O_CREAT | O_EXCL``, atomic on local filesystems and on
NFS v3 and later.
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from pspnet_jax import output_dir
from pspnet_jax.errors import UserError

LOCK_FILE = '.lock'


def _start_time(pid: int) -> str | None:
  """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22), None if there is
  no such process; '' where /proc is missing (the pid alone then identifies it)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except FileNotFoundError:
    if not os.path.isdir('/proc/self'):
      try:
        os.kill(pid, 0)
        return ''
      except ProcessLookupError:
        return None
      except PermissionError:
        return ''
    return None


class WorkdirLock:
  """``with WorkdirLock(workdir):`` around a run; raises ``UserError`` when another live
  process holds the workdir."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._held = False

  def __enter__(self):
    problem = ''
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        problem = str(e)
    if jax.process_count() > 1:
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
      if refused and not problem:
        problem = (
          f'{os.path.dirname(self.path)} is in use by another run (process 0 of this job says so)'
        )
    if problem:
      raise UserError(problem)
    return self

  def __exit__(self, *exc):
    self.release()

  def release(self):
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def _acquire(self):
    me = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'start': _start_time(os.getpid()),
      'since': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:  # gone: take it over (the next try creates the file afresh)
          continue
        raise UserError(  # noqa: B904  (the FileExistsError is the expected case, not a fault)
          f'--workdir {os.path.dirname(self.path)} is in use by another run: process '
          f'{holder.get("pid")} on {holder.get("host")}, since {holder.get("since")} (wait for '
          f'it or stop it, or give another --workdir; if that run is gone, remove {self.path})'
        )
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._held = True
      return
    raise UserError(
      f'{self.path}: cannot take the workdir lock (it keeps changing: another run '
      'is starting on this workdir?)'
    )

  def _remove_stale(self, stale: dict) -> bool:
    """Removes the lock file if it still holds ``stale``. Two runs may find the same stale
    lock: each moves the file to a name of its own first (atomic), and one that moved a
    lock other than the stale one (the other run's new lock) puts it back."""
    aside = f'{self.path}.{os.getpid()}.stale'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False  # another run took it over first
    try:
      with open(aside) as f:
        moved = json.load(f)
    except (OSError, ValueError):
      moved = {}
    if moved != stale and moved:
      os.rename(aside, self.path)  # the other run's live lock: back where it was
      return False
    os.remove(aside)
    return True

  def _holder(self) -> dict | None:
    """The live holder's record, or None after removing the lock of one that is gone."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      holder = {}
    if holder.get('host') == socket.gethostname():
      alive = (
        _start_time(int(holder.get('pid', -1))) if str(holder.get('pid', '')).isdigit() else None
      )
      if alive is None or (holder.get('start') and alive and alive != holder['start']):
        if self._remove_stale(holder):
          print(
            f'note: took over {self.path} from process {holder.get("pid")}, which is gone',
            flush=True,
          )
        return None  # the caller tries again: creating the file decides who holds it
    elif not holder:  # unreadable (a half-written file): its writer may still be starting
      holder = {'pid': '?', 'host': '?', 'since': '?'}
    return holder


RUN_CONFIG = 'config.json'


def record_config(workdir: str, config, conv: dict) -> None:
  """Writes ``WORKDIR/config.json`` (process 0): the config of this start of the run, every
  key, and the convolution settings in effect (``pspnet_jax.ops.backend.settings``, which
  the environment may override), with the jax version. A resumed run rewrites it."""
  if jax.process_index() != 0:
    return
  record = {
    'config': json.loads(config.to_json_best_effort()),
    'conv': conv,
    'jax': jax.__version__,
  }
  with output_dir.atomic(os.path.join(workdir, RUN_CONFIG)) as tmp, open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
