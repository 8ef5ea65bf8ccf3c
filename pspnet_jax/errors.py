"""A user's error, and how every command reports one: a single line on stderr,
``error: <what is wrong, naming the file, key or value> (<what to do>)``, exit status 2, no
traceback. ``PSPNET_DEBUG=1`` shows the traceback as well. Any other exception is a bug
and keeps its traceback.

The errors of each outside format (``CheckpointError``, ``PortError``, the data builders'
``BadExampleError``...) are ``UserError``\\ s, raised where the bad input enters.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """Bad input the user can fix; the message says what and where, and what to do."""


def one_line(message: str) -> str:
  return ' '.join(str(message).split())


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

  return run


def _config_keys(config, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    keys.append(path)
    if hasattr(value, 'items'):
      keys += _config_keys(value, path + '.')
  return keys


def check_config_overrides(argv: list[str], default_config: str) -> None:
  """Refuses ``--config.KEY=VALUE`` flags whose KEY the config file does not have, naming
  the key and the closest known ones, before absl parses them (ml_collections would fail
  deep inside flag parsing with an AttributeError). Exits 2 on an unknown key."""
  path, overrides = default_config, []
  args = iter(argv[1:])
  for arg in args:
    if arg == '--config':
      path = next(args, path)
    elif arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      overrides.append(arg[len('--config.'):].split('=', 1)[0])
  if not overrides:
    return
  if not os.path.isfile(path):
    _refuse(f'--config {path}: no such file (give a config file from configs/)')
  spec = importlib.util.spec_from_file_location('_pspnet_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # the config file itself is broken: absl will report it in full
    return
  for key in overrides:
    problem = unknown_config_key(config, key, f'--config.{key}')
    if problem:
      _refuse(problem)


def unknown_config_key(config, key: str, flag: str) -> str | None:
  """None if the dotted ``key`` is one of ``config``'s, else the one-line message for the
  ``flag`` that named it, with the closest known keys."""
  known = _config_keys(config)
  if key in known:
    return None
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
  hint = f'did you mean {", ".join(close)}? ' if close else ''
  return (f'unknown config key {key!r} in {flag} ({hint}every key is listed, with its '
          'default, in configs/semseg_recipe.py)')


def _refuse(message: str):
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)
