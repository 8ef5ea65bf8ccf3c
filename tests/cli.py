"""The environment of every command a test runs in a subprocess (train.py, eval.py, the
port, export and prepare CLIs, multi-device scripts): the repository on PYTHONPATH, an
optional forced host device count, no PSPNET_DEBUG, and one XLA compilation cache shared
by the whole test session.

The cache is what keeps the CLI tests affordable: most of them run the same tiny model
on the same shapes, and each fresh process would otherwise compile the same train and
eval steps again (a 12-step train.py run: ~95 s cold, ~30 s with the cache, on 2 loaded
cores). XLA's cache key covers the program, the compile options, XLA_FLAGS and the jax
version, so a run that differs in any of them compiles its own. conftest.py creates the
folder for the session (under pytest-xdist, once for all workers) and removes it afterwards.
"""

import contextlib
import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_CACHE = None  # set by conftest.py for the session


def cli_env(devices: int | None = None, **extra: str) -> dict:
  """``os.environ`` for a subprocess of the test suite; ``devices`` forces that many CPU
  devices (``--xla_force_host_platform_device_count``)."""
  env = dict(
    os.environ,
    PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
    PYTHONUNBUFFERED='1',
  )
  env.pop('PSPNET_DEBUG', None)
  if devices is not None:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if COMPILE_CACHE is not None:
    env.update(
      JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
      # A size limit turns on the cache's file lock: pytest-xdist workers and
      # multi-process tests read and write it at the same time, and without the
      # lock a reader can meet a half-written entry.
      JAX_COMPILATION_CACHE_MAX_SIZE=str(16 << 30),
    )
  env.update(extra)
  return env


def free_port() -> int:
  """A TCP port free on the loopback interface now (for a coordinator or a server)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_together(commands, *, env: dict, timeout: float) -> list[tuple[int, str]]:
  """Starts every command at once (the processes of one multi-process job) and waits for
  all, each bounded by ``timeout`` and killed if still running; ``(returncode, output)``
  each, stderr merged into stdout."""
  procs = [
    subprocess.Popen(
      cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for cmd in commands
  ]
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out) for p, out in zip(procs, outs)]


@contextlib.contextmanager
def mounted_tmpfs(path, *, size: str = '1m', read_only: bool = False):
  """A small (or read-only) filesystem at ``path`` for the duration: where a disk is full
  or cannot be written. Needs root (CI runs as root); skips the test, saying why, elsewhere."""
  import pytest

  os.makedirs(path, exist_ok=True)
  options = f'size={size}' + (',ro' if read_only else '')
  if os.geteuid() != 0:
    pytest.skip('mounting a small filesystem needs root (CI runs as root)')
  p = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True, text=True
  )
  if p.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {p.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


def one_error_line(p, *needles) -> str:
  """The single ``error:`` line of a finished command that refused its input: exit status
  2, no traceback, each of ``needles`` in the line."""
  assert p.returncode == 2, (p.returncode, p.stdout[-1500:], p.stderr[-3000:])
  lines = [l for l in p.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]
