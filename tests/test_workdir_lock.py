"""pspnet_jax.train.workdir.WorkdirLock in-process (the two-process refusal runs train.py
in tests/test_train_loop.py): a lock whose process is gone is taken over, one held by a live
process is not, and of two runs that find the same stale lock only one takes it."""

import json
import os
import socket
import subprocess
import sys

import pytest

from pspnet_jax.errors import UserError
from pspnet_jax.train.workdir import LOCK_FILE, WorkdirLock, _start_time


def _dead_pid():
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def _write(path, record):
  path.write_text(json.dumps(record))


def test_stale_lock_taken_over_live_one_refused_and_released_on_exit(tmp_path, capsys):
  lock = tmp_path / LOCK_FILE
  _write(lock, {'host': socket.gethostname(), 'pid': _dead_pid(), 'start': '1', 'since': 'then'})
  with WorkdirLock(str(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    assert 'took over' in capsys.readouterr().out
    with pytest.raises(UserError, match=f'in use by another run: process {os.getpid()} on '):
      WorkdirLock(str(tmp_path)).__enter__()
  assert not lock.exists()
  # a live process on another host cannot be checked: refused, naming it
  _write(lock, {'host': 'elsewhere', 'pid': 7, 'start': '1', 'since': 'then'})
  with pytest.raises(UserError, match='process 7 on elsewhere'):
    WorkdirLock(str(tmp_path)).__enter__()
  assert json.loads(lock.read_text())['host'] == 'elsewhere'


def test_of_two_runs_finding_one_stale_lock_only_one_takes_it(tmp_path):
  """Run B read the stale record; run A has meanwhile replaced the lock with its own live
  one: B's takeover moves A's lock aside, sees it is not the stale one, and puts it back."""
  lock = tmp_path / LOCK_FILE
  stale = {'host': socket.gethostname(), 'pid': _dead_pid(), 'start': '1', 'since': 'then'}
  live = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'start': _start_time(os.getpid()),
    'since': 'now',
  }
  _write(lock, live)
  assert WorkdirLock(str(tmp_path))._remove_stale(stale) is False
  assert json.loads(lock.read_text()) == live and os.listdir(tmp_path) == [LOCK_FILE]
  _write(lock, stale)
  assert WorkdirLock(str(tmp_path))._remove_stale(stale) is True and not os.listdir(tmp_path)
