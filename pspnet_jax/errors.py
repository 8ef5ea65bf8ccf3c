"""A user's error, and how every command reports one: a single line on stderr,
``error: <what is wrong, naming the file, key or value> (<what to do>)``, exit status 2, no
traceback. ``PSPNET_DEBUG=1`` shows the traceback as well. Any other exception is a bug
and keeps its traceback.

A full or read-only disk met while writing (``STORAGE_ERRNOS``) is one line too, and
Ctrl-C one line with exit status 130.

The errors of each outside format (``CheckpointError``, ``PortError``, the data builders'
``BadExampleError``...) are ``UserError``\\ s, raised where the bad input enters.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class UserError(ValueError):
  """Bad input the user can fix; the message says what and where, and what to do."""


def one_line(message: str) -> str:
  return ' '.join(str(message).split())


# Errors of the storage a command writes to, which the user fixes outside the program.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def storage_error(e: OSError) -> str:
  """One line for a failed write: what failed, where, and what to do."""
  where = f' writing {e.filename}' if e.filename else ''
  return (
    f'{e.strerror}{where} (free space or give a writable folder on another disk, then run '
    'the same command again)'
  )


def command(main):
  """Decorates a command's ``main``: a ``UserError`` becomes one line and exit status 2."""

  @functools.wraps(main)
  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      if os.environ.get('PSPNET_DEBUG'):
        raise
      print(f'error: {one_line(e)}', file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
      if os.environ.get('PSPNET_DEBUG'):
        raise
      print(
        '\ninterrupted: stopped (files are written whole or not at all: run the same command '
        'again)',
        file=sys.stderr,
      )
      sys.exit(EXIT_INTERRUPTED)
    except OSError as e:  # the machine's, not the program's: a full disk, a read-only one
      if e.errno not in STORAGE_ERRNOS or os.environ.get('PSPNET_DEBUG'):
        raise
      print(f'error: {storage_error(e)}', file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  return run


def int_at_least(minimum: int):
  """An argparse ``type``: a whole number >= ``minimum`` (argparse names the flag)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f'{value} is out of range: give a whole number >= {minimum}')
    return value

  return parse


def refuse(message: str):
  """Prints ``message`` as the one error line and exits with status 2 (outside ``command``)."""
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)
