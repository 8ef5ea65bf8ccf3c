"""A command's --config file at the CLI boundary: found from any folder, each fault of the
file one line (the traceback under PSPNET_DEBUG=1), every numeric key checked against its
range before anything runs or is written."""

import copy
import math
import os
import re
import subprocess
import sys

import pytest
from cli import ROOT, cli_env, one_error_line

from pspnet_jax import config_file
from pspnet_jax.errors import UserError

BUNDLED = [
  os.path.join(ROOT, 'configs', f)
  for f in sorted(os.listdir(os.path.join(ROOT, 'configs')))
  if f.endswith('.py') and not f.startswith('_') and not f.endswith('_recipe.py')
]


def _run(script, *args, cwd, debug=False):
  env = cli_env(**({'PSPNET_DEBUG': '1'} if debug else {}))
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, script), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_the_readme_config_path_works_from_another_folder_and_a_missing_one_is_named(tmp_path):
  """From a folder that is not the repository, the README's relative --config path finds
  the bundled file (the run gets as far as the value check); a name finds it too; a path
  that exists nowhere is one line naming it and the folders searched. Nothing is written."""
  workdir = tmp_path / 'run'
  for config in ('configs/synthetic.py', 'synthetic'):
    line = one_error_line(
      _run(
        'train.py',
        '--config',
        config,
        '--workdir',
        str(workdir),
        '--config.augment.crop_size=-5',
        cwd=tmp_path,
      )
    )
    assert line == (
      'error: config key augment.crop_size=-5 is out of range: give a whole number '
      'in [1, inf) (--config.augment.crop_size=...)'
    ), line
  line = one_error_line(
    _run('train.py', '--config', 'configs/x.py', '--workdir', str(workdir), cwd=tmp_path)
  )
  assert line.startswith(
    f'error: no config file configs/x.py (looked for it in {tmp_path} and {ROOT};'
  ), line
  assert 'synthetic' in line and 'ade20k_pspnet50' in line
  assert os.listdir(tmp_path) == []


def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path):
  cases = {
    'syntax.py': (
      'import ml_collections\ndef get_config(:\n  pass\n',
      'error: syntax.py line 2: invalid syntax',
    ),
    'raises.py': (
      'def get_config():\n  x = 1\n  raise ValueError("boom")\n',
      'error: raises.py: get_config() raised ValueError: boom at line 3',
    ),
    'import_time.py': (
      'import ml_collections\nLIMIT = 1 / 0\n',
      'error: import_time.py line 2: ZeroDivisionError: division by zero',
    ),
    'no_function.py': ('CROP = 473\n', 'error: no_function.py: has no get_config() function'),
  }
  for name, (text, start) in cases.items():
    (tmp_path / name).write_text(text)
    line = one_error_line(
      _run('train.py', '--config', name, '--workdir', str(tmp_path / 'w'), cwd=tmp_path)
    )
    assert line.startswith(start), (name, line)
  line = one_error_line(
    _run('eval.py', '--config', 'raises.py', '--workdir', str(tmp_path / 'w'), cwd=tmp_path)
  )
  assert line.startswith(cases['raises.py'][1]), line
  assert not (tmp_path / 'w').exists()
  debug = _run(
    'train.py', '--config', 'raises.py', '--workdir', str(tmp_path / 'w'), cwd=tmp_path, debug=True
  )
  assert (
    debug.returncode != 0 and 'Traceback' in debug.stderr and 'ValueError: boom' in debug.stderr
  )


def test_out_of_range_values_are_refused_by_every_config_command(tmp_path):
  workdir = tmp_path / 'never'
  line = one_error_line(
    _run('train.py', '--workdir', str(workdir), '--config.augment.scale_min=3', cwd=tmp_path)
  )
  assert 'augment.scale_min=3.0 and augment.scale_max=1.5' in line, line
  line = one_error_line(
    _run('eval.py', '--workdir', str(workdir), '--config.eval.scales=(0.5,-1.0)', cwd=tmp_path)
  )
  assert 'eval.scales=(0.5, -1.0) is out of range: give each a number in (0, inf)' in line, line
  assert not workdir.exists()


@pytest.mark.parametrize('path', BUNDLED, ids=os.path.basename)
def test_every_numeric_key_of_every_bundled_config_has_a_range_its_default_meets(path):
  config = config_file.load(path)
  numeric = [
    k
    for k, v in config_file.config_keys(config).items()
    if isinstance(v, (int, float))
    and not isinstance(v, bool)
    or isinstance(v, tuple)
    and v
    and all(isinstance(x, (int, float)) for x in v)
  ]
  assert numeric and set(numeric) <= set(config_file.RANGES), set(numeric) - set(config_file.RANGES)
  config_file.check_values(config)


def test_each_range_refuses_values_outside_it_and_names_the_key():
  config = config_file.load(os.path.join(ROOT, 'configs', 'synthetic.py')).to_dict()
  present = config_file.config_keys(config)
  checked = 0
  for key, rule in config_file.RANGES.items():
    if key not in present:
      continue
    low, high = (float(x) for x in rule.split('int ')[-1][1:-1].split(','))
    bad = [float('nan'), low - 1 if low > -math.inf else high + 1]
    bad += [low] if rule.split('int ')[-1][0] == '(' else []
    bad += [high] if rule.endswith(')') and high < math.inf else []
    bad += [low + 0.5] if rule.startswith('int') else []
    for value in bad:
      c = copy.deepcopy(config)
      *parents, last = key.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[last] = (value,) if isinstance(node[last], tuple) else value
      with pytest.raises(UserError, match=f'config key {re.escape(key)}='):
        config_file.check_values(c)
      checked += 1
  assert checked > 2 * len(present) // 3


@pytest.mark.parametrize('section', ['augment', 'optimizer', 'eval'])
def test_config_sections_are_their_dataclasses_and_each_default_has_its_fields_type(section):
  """base_config's augment, optimizer and eval sections are built from AugmentConfig,
  OptimizerConfig and EvalConfig (one source of defaults): the same keys and values, and each
  default of the type its field declares (a float field holds a float: ml_collections then
  accepts --config.augment.rotate_min=-5 and =-5.5 alike; an int one an int, not a bool)."""
  import dataclasses

  from configs.semseg_recipe import base_config
  from pspnet_jax.data import AugmentConfig
  from pspnet_jax.evaluation import EvalConfig
  from pspnet_jax.train import OptimizerConfig

  schema = {'augment': AugmentConfig, 'optimizer': OptimizerConfig, 'eval': EvalConfig}[section]
  config = base_config()
  fields = dataclasses.fields(schema)
  assert dict(config[section]) == {f.name: getattr(schema(), f.name) for f in fields}
  kinds = {'float': float, 'int': int, 'bool': bool, 'str': str}
  for f in fields:
    value = getattr(schema(), f.name)
    declared = f.type if isinstance(f.type, str) else getattr(f.type, '__name__', str(f.type))
    if declared in kinds:
      assert type(value) is kinds[declared], (f.name, declared, value)
    else:
      assert declared.startswith('tuple') and isinstance(value, tuple), (f.name, declared)
  for key in [f.name for f in fields if f.type in ('float', float)]:
    for given in (-5, -5.5):  # an int or a float into a float key, as the CLI gives them
      c = base_config()
      c[section][key] = given
      assert c[section][key] == given
