"""A command's ``--config`` file: found, loaded and checked before anything runs, each fault
one line (``pspnet_jax.errors``); ``PSPNET_DEBUG=1`` shows the traceback as well.

- **Where it is.** A relative path is taken from the current folder first, then from the
  folder holding this project's bundled ``configs/`` (so the README's ``--config
  configs/synthetic.py`` works from any folder); a bare name (``ade20k_pspnet50``) is a
  bundled config. Not found: one line naming the path, the folders it was looked for in and
  the bundled configs.
- **Loading it.** A syntax error, an exception while the file runs, a missing or raising
  ``get_config()``: one line naming the file, the line where Python gives one, and the error.
- **Its keys.** ``--config.KEY=VALUE`` naming a key the file does not have: one line with
  the closest keys (ml_collections would fail deep inside flag parsing).
- **Its values.** Every numeric key has a range (``RANGES``); ``check_values`` names the key,
  its value and the range, before anything is written (a negative crop size would otherwise
  fail inside the data workers).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import sys
import traceback

from pspnet_jax.errors import UserError, refuse

# The project root: the folder that holds the bundled configs/ (a source checkout).
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.join(PROJECT_ROOT, 'configs')
DEFAULT = os.path.join(BUNDLED_DIR, 'synthetic.py')

# The range of every numeric config key, as an interval: '[' / ']' include the bound,
# '(' / ')' exclude it; 'int' marks keys that take whole numbers. Keys a config lacks are
# not checked; tests/test_config_file.py checks every numeric key of every bundled config
# has one.
RANGES = {
  'seed': 'int [0, inf)',
  'global_batch_size': 'int [1, inf)',
  'grad_accum_steps': 'int [1, inf)',
  'num_epochs': '(0, inf)',
  'num_steps': 'int [0, inf)',
  'aux_weight': '[0, inf)',
  'loss_block_rows': 'int [0, inf)',
  'divergence_factor': '[0, inf)',
  'worker_count': 'int [0, inf)',
  'log_every_steps': 'int [1, inf)',
  'checkpoint_every_steps': 'int [1, inf)',
  'keep_checkpoints': 'int [1, inf)',
  'eval_every_steps': 'int [0, inf)',
  'eval_num_examples': 'int [0, inf)',
  'model.depth': 'int [1, inf)',
  'model.output_stride': 'int [1, inf)',
  'model.base_width': 'int [1, inf)',
  'model.head_channels': 'int [1, inf)',
  'model.aux_channels': 'int [0, inf)',
  'model.ppm_channels': 'int [0, inf)',
  'model.width_mult': '(0, inf)',
  'model.dropout': '[0, 1)',
  'model.bins': 'int [1, inf)',
  'augment.crop_size': 'int [1, inf)',
  'augment.scale_min': '(0, inf)',
  'augment.scale_max': '(0, inf)',
  'augment.rotate_min': '[-180, 180]',
  'augment.rotate_max': '[-180, 180]',
  'augment.ignore_label': 'int [0, 255]',
  'augment.brightness_delta': '[0, 255]',
  'augment.scale_base': 'int [1, inf)',
  'augment.cat_max_ratio': '(0, 1]',
  'augment.contrast_range': '[0, inf)',
  'augment.saturation_range': '[0, inf)',
  'augment.hue_delta': 'int [0, 90]',
  'optimizer.learning_rate': '[0, inf)',
  'optimizer.momentum': '[0, 1)',
  'optimizer.weight_decay': '[0, inf)',
  'optimizer.power': '[0, inf)',
  'optimizer.warmup_steps': 'int [0, inf)',
  'optimizer.head_lr_multiplier': '(0, inf)',
  'optimizer.clip_grad_norm': '[0, inf)',
  'optimizer.b1': '[0, 1)',
  'optimizer.b2': '[0, 1)',
  'optimizer.bn_l1': '[0, inf)',
  'eval.scales': '(0, inf)',
  'eval.crop_size': 'int [1, inf)',
  'eval.stride_rate': '(0, 1]',
  'eval.base_size': 'int [1, inf)',
  'eval.window_batch': 'int [0, inf)',
  'eval.bucket_multiple': 'int [1, inf)',
  'eval.whole_multiple': 'int [1, inf)',
  'eval.ignore_label': 'int [0, 255]',
  'distill.tau': '(0, inf)',
  'distill.weight': '[0, inf)',
  'dataset.builder_kwargs.image_size': 'int [8, inf)',
  'dataset.builder_kwargs.num_train': 'int [1, inf)',
  'dataset.builder_kwargs.num_val': 'int [1, inf)',
}
# Pairs whose first must not exceed the second.
ORDERED = (('augment.scale_min', 'augment.scale_max'), ('augment.rotate_min', 'augment.rotate_max'))
# Tuple keys for which () means "off".
MAY_BE_EMPTY = ('augment.scale_base',)
# (low, high) keys.
INTERVALS = ('augment.contrast_range', 'augment.saturation_range')

_INTERVAL = re.compile(r'^(int )?([\[(])\s*(\S+),\s*(\S+)\s*([\])])$')


def _in_range(value, rule: str) -> bool:
  whole, low_bracket, low, high, high_bracket = _INTERVAL.match(rule).groups()
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if math.isnan(value) or (whole and value != int(value)):
    return False
  low, high = float(low), float(high)
  return (value >= low if low_bracket == '[' else value > low) and (
    value <= high if high_bracket == ']' else value < high
  )


def _describe(rule: str) -> str:
  whole, low_bracket, low, high, high_bracket = _INTERVAL.match(rule).groups()
  kind = 'a whole number' if whole else 'a number'
  return f'{kind} in {low_bracket}{low}, {high}{high_bracket}'


def config_keys(config, prefix: str = '') -> dict:
  """Every dotted key of ``config`` -> its value (sub-configs included as keys too)."""
  keys = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    keys[path] = value
    if hasattr(value, 'items'):
      keys.update(config_keys(value, path + '.'))
  return keys


def check_values(config) -> None:
  """Raises ``UserError`` at the first numeric key outside its range (``RANGES``), naming
  the key, its value and the range."""
  keys = config_keys(config)
  for key, rule in RANGES.items():
    if key not in keys:
      continue
    value = keys[key]
    values = value if isinstance(value, (tuple, list)) else (value,)
    if (not values and key not in MAY_BE_EMPTY) or not all(_in_range(v, rule) for v in values):
      each = ' each' if isinstance(value, (tuple, list)) else ''
      raise UserError(
        f'config key {key}={value!r} is out of range: give{each} {_describe(rule)} '
        f'(--config.{key}=...)'
      )
  base = keys.get('augment.scale_base')
  if base is not None and len(base) not in (0, 2):
    raise UserError(f'config key augment.scale_base={base!r}: give () or (long, short)')
  for key in INTERVALS:
    value = keys.get(key)
    if value is not None and (len(value) != 2 or value[0] > value[1]):
      raise UserError(f'config key {key}={value!r}: give (low, high) with low <= high')
  for low, high in ORDERED:
    if low in keys and high in keys and keys[low] > keys[high]:
      raise UserError(
        f'config keys {low}={keys[low]!r} and {high}={keys[high]!r}: {low} must not exceed {high}'
      )


def unknown_config_key(config, key: str, flag: str) -> str | None:
  """None if the dotted ``key`` is one of ``config``'s, else the one-line message for the
  ``flag`` that named it, with the closest known keys."""
  known = list(config_keys(config))
  if key in known:
    return None
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
  hint = f'did you mean {", ".join(close)}? ' if close else ''
  return (
    f'unknown config key {key!r} in {flag} ({hint}every key is listed, with its '
    'default, in configs/semseg_recipe.py)'
  )


def bundled_names() -> list[str]:
  if not os.path.isdir(BUNDLED_DIR):
    return []
  return sorted(
    f[:-3]
    for f in os.listdir(BUNDLED_DIR)
    if f.endswith('.py') and not f.startswith('_') and not f.endswith('_recipe.py')
  )


def resolve(path: str) -> str:
  """The config file ``path`` names (see the module docstring); ``UserError`` if none."""
  path = os.path.expanduser(path)
  candidates = [os.path.abspath(path)]
  if not os.path.isabs(path):
    candidates.append(os.path.join(PROJECT_ROOT, path))
    name = os.path.basename(path)
    if os.path.dirname(path) in ('', 'configs'):
      candidates.append(os.path.join(BUNDLED_DIR, name if name.endswith('.py') else name + '.py'))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  looked = os.getcwd() if os.path.isabs(path) else f'{os.getcwd()} and {PROJECT_ROOT}'
  raise UserError(
    f'no config file {path} (looked for it in {looked}; the bundled configs, by '
    f'name or as configs/NAME.py: {", ".join(bundled_names()) or "none"})'
  )


def load(path: str, arg: str | None = None):
  """Runs the config file at ``path`` and returns its ``get_config()``; each fault one
  ``UserError`` naming the file (and the line where Python gives one)."""
  if PROJECT_ROOT not in sys.path:  # the bundled configs import configs.semseg_recipe
    sys.path.append(PROJECT_ROOT)
  shown = os.path.relpath(path) if not os.path.relpath(path).startswith('..') else path
  try:
    spec = importlib.util.spec_from_file_location('_pspnet_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f'{shown} line {e.lineno}: {e.msg} (fix the config file)') from e
  except Exception as e:
    line = _line_in(e, path)
    raise UserError(
      f'{shown}{f" line {line}" if line else ""}: {type(e).__name__}: {e} (fix the config file)'
    ) from e
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(
      f'{shown}: has no get_config() function (a config file defines get_config() '
      'returning an ml_collections.ConfigDict; see configs/synthetic.py)'
    )
  try:
    config = module.get_config() if arg is None else module.get_config(arg)
  except Exception as e:
    line = _line_in(e, path)
    raise UserError(
      f'{shown}: get_config() raised {type(e).__name__}: {e}'
      f'{f" at line {line}" if line else ""} (fix the config file)'
    ) from e
  if not hasattr(config, 'items'):
    raise UserError(
      f'{shown}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict'
    )
  return config


def _line_in(error: BaseException, path: str) -> int | None:
  """The last line of the config file in ``error``'s traceback."""
  lines = [
    f.lineno
    for f in traceback.extract_tb(error.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  return lines[-1] if lines else None


def prepare_argv(argv: list[str]) -> list[str]:
  """Run by a command before absl parses ``argv``: finds and loads the ``--config`` file and
  checks its ``--config.KEY`` overrides, exiting with one line on a fault. Returns ``argv``
  with the config path made absolute (absl then loads the same file)."""
  argv = list(argv)
  index, path, overrides = None, None, []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == '--config' and i + 1 < len(argv):
      index, path = i + 1, argv[i + 1]
    elif arg.startswith('--config='):
      index, path = i, arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      overrides.append(arg[len('--config.') :].split('=', 1)[0])
  try:
    config_arg = None
    if path is not None and ':' in path and not os.path.isfile(path):
      path, config_arg = path.rsplit(':', 1)  # ml_collections' FILE.py:ARG -> get_config(ARG)
    resolved = resolve(path) if path is not None else DEFAULT
    config = load(resolved, config_arg)
    for key in overrides:
      problem = unknown_config_key(config, key, f'--config.{key}')
      if problem:
        raise UserError(problem)
  except UserError as e:
    if os.environ.get('PSPNET_DEBUG'):
      raise
    refuse(str(e))
  if index is not None:
    resolved = resolved if config_arg is None else f'{resolved}:{config_arg}'
    argv[index] = f'--config={resolved}' if argv[index].startswith('--config=') else resolved
  return argv
