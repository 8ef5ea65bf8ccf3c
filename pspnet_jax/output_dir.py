"""Where a command's outputs go: the one owner of the checks on an output folder, shared by
``eval.py``, predict, export and the port CLI, run before any work so that a refused
command has computed and written nothing.

- the folder is not an existing file, and this process can write where it will be (checked
  by creating and removing a probe folder: catches read-only filesystems, permissions and
  quotas that ``os.access`` does not);
- a non-empty folder is refused unless it holds an earlier output of the same command (its
  ``marker`` file): outputs never land among a user's other files;
- the files a run will write never replace one of its inputs (``protect``);
- each file is written under a temporary name and renamed when complete (``atomic``): an
  interrupted run or a full disk never leaves a half-written file, nor destroys the earlier
  file of that name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable

from pspnet_jax.errors import UserError


def claim(
  path: str | os.PathLike,
  *,
  flag: str = '--out',
  marker: str | None = None,
  what: str = 'output',
  writes: Iterable[str] = (),
  protect: Iterable[str] = (),
) -> str:
  """Checks the output folder ``path`` as the module docstring says; returns its absolute
  path (not created). ``writes``: the names of the files the run will write there;
  ``protect``: the paths of its inputs."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  check_writable(path, flag)
  if (
    marker
    and os.path.isdir(path)
    and os.listdir(path)
    and not os.path.exists(os.path.join(path, marker))
  ):
    raise UserError(
      f'{flag} {path} is a folder that holds other files and no earlier {what} (no '
      f'{marker}): give a new or empty folder (nothing was run)'
    )
  protected = {os.path.realpath(p) for p in protect}
  for name in writes:
    target = os.path.realpath(os.path.join(path, name))
    if target in protected:
      raise UserError(
        f'{flag} {path}: writing {name} there would replace the input {target}; '
        'choose another folder (nothing was run)'
      )
  return path


def check_writable(path: str, flag: str = '--out') -> None:
  """``UserError`` unless this process can create ``path`` (or write into it)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag} {path} is a file, not a folder (give a folder; nothing was run)')
  existing = path
  while not os.path.isdir(existing):
    parent = os.path.dirname(existing)
    if os.path.exists(existing) or parent == existing:
      raise UserError(
        f'{flag} {path}: {existing} is not a folder (give a folder path; nothing was run)'
      )
    existing = parent
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.pspnet-write-check-', dir=existing))
  except OSError as e:
    raise UserError(
      f'{flag} {path}: cannot write in {existing} ({e.strerror}); give a folder '
      'this user can write to (nothing was run)'
    ) from None


@contextlib.contextmanager
def atomic(path: str):
  """Yields a temporary path beside ``path`` (same extension, so writers that go by it
  still do), renamed to ``path`` when the block completes; removed if it does not."""
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp{os.path.splitext(name)[1]}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
