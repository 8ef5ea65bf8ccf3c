"""The briefly trained tiny model the suite shares: train.py on configs/synthetic.py for 12
steps on a 32x32 synthetic_shapes (64 training, 8 validation images) at width 8, in a
subprocess. conftest.py holds the session fixtures (``data_dir``, ``reference_run``) that
build it once; test_train_loop.py starts its own variants of the run from here."""

import os
import subprocess
import sys

from cli import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420

TINY = [
  '--config.dataset.builder_kwargs.image_size=32',
  '--config.dataset.builder_kwargs.num_train=64',
  '--config.dataset.builder_kwargs.num_val=8',
  '--config.model.base_width=8',
  '--config.model.head_channels=16',
  '--config.model.aux_channels=8',
  '--config.augment.crop_size=33',
  '--config.global_batch_size=4',
  '--config.num_steps=12',
  '--config.log_every_steps=1',
  '--config.checkpoint_every_steps=4',
  '--config.eval_every_steps=0',
  '--config.eval.crop_size=33',
  '--config.eval.base_size=32',
  '--config.optimizer.learning_rate=0.05',
]


def prepare_data(data_dir) -> str:
  """The tiny synthetic_shapes dataset prepared in ``data_dir``."""
  from pspnet_jax import data

  data.prepare('synthetic_shapes', str(data_dir), image_size=32, num_train=64, num_val=8)
  return str(data_dir)


def train_command(workdir, data_dir, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    os.path.join(ROOT, 'configs', 'synthetic.py'),
    '--workdir',
    str(workdir),
    f'--config.dataset.data_dir={data_dir}',
    *TINY,
    *extra,
  ]


def train(workdir, data_dir, *extra, devices=1, check=True):
  p = subprocess.run(
    train_command(workdir, data_dir, *extra),
    env=cli_env(devices),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=ROOT,
  )
  if check and p.returncode != 0:
    raise AssertionError(
      f'train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    )
  return p
