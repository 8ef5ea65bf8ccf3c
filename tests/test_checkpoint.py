"""Model directories: save -> load round trip and clear errors for non-checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from tiny_models import random_model

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNetConfig


def test_save_load_round_trip_is_exact(tmp_path):
  cfg = PSPNetConfig(depth=18, num_classes=5, base_width=16, stem='deep32', align_corners=False)
  model = random_model(cfg, seed=3)
  checkpoint.save_model(tmp_path / 'm', model, metadata={'source': 'test'})
  loaded = checkpoint.load_model(tmp_path / 'm')
  assert loaded.config == cfg
  a = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  b = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Any(nnx.Param, nnx.BatchStat))))
  assert len(a) == len(b)
  for path, v in a:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[path][...]))
  assert checkpoint.read_model_config(str(tmp_path / 'm'))[1] == {'source': 'test'}


def test_load_errors_name_the_path(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='no such directory'):
    checkpoint.load_model(tmp_path / 'nope')
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(checkpoint.CheckpointError, match='model_config.json'):
    checkpoint.load_model(tmp_path / 'empty')
  os.makedirs(tmp_path / 'bad')
  (tmp_path / 'bad' / 'model_config.json').write_text(
    json.dumps({'model': {'depth': 50, 'colour': 1}})
  )
  with pytest.raises(checkpoint.CheckpointError, match='colour'):
    checkpoint.load_model(tmp_path / 'bad')
  (tmp_path / 'bad' / 'model_config.json').write_text(json.dumps({'model': {'depth': 18}}))
  with pytest.raises(checkpoint.CheckpointError, match='nothing to load yet'):
    checkpoint.load_model(tmp_path / 'bad')
  os.makedirs(tmp_path / 'bad' / 'state')
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore the model variables'):
    checkpoint.load_model(tmp_path / 'bad')


def test_train_checkpoints_keep_the_latest_k_and_the_best_miou(tmp_path):
  """keep=2: after saving steps 1-6 (validation mIoU at 1-5, none at 6, as a preemption
  save has none) the latest two (5, 6) and the best by mIoU (2) remain, and that best
  step restores its own values. A new checkpointer on the same workdir (a resumed run)
  still knows step 2 is the best: after saving 7 and 8 it keeps 2, 7 and 8."""
  import optax

  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), PSPNetConfig(depth=18), keep=2)
  tx = optax.sgd(0.1, momentum=0.9)
  mious = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4}
  for step in range(1, 7):
    _one_step(ckpt, step, tx, {'miou': mious[step]} if step in mious else None)
  assert sorted(ckpt.manager.all_steps()) == [2, 5, 6]
  assert ckpt.latest_step() == 6

  model, _, meta, data_state = ckpt.restore(2, **_targets(tx))
  np.testing.assert_array_equal(np.asarray(model['params']['w']), [2.0, 2.0, 2.0])
  assert meta == {'step': 2} and data_state == {'step': 2, 'seed': 7}
  ckpt.close()

  resumed = checkpoint.TrainCheckpointer(str(tmp_path), PSPNetConfig(depth=18), keep=2)
  for step, miou in ((7, 0.5), (8, None)):
    _one_step(resumed, step, tx, None if miou is None else {'miou': miou})
  assert sorted(resumed.manager.all_steps()) == [2, 7, 8]
  resumed.close()


def test_a_model_config_written_before_the_normalisation_fields_loads_with_semseg_s(tmp_path):
  """model_config.json files from before ``mean`` / ``std`` were config fields: ImageNet's."""
  from pspnet_jax.normalize import MEAN, STD

  os.makedirs(tmp_path / 'old')
  (tmp_path / 'old' / 'model_config.json').write_text(
    json.dumps({'model': {'depth': 18, 'num_classes': 5}})
  )
  config = checkpoint.model_config(tmp_path / 'old')
  assert config == PSPNetConfig(depth=18, num_classes=5)
  np.testing.assert_array_equal(np.float32(config.mean), MEAN)
  np.testing.assert_array_equal(np.float32(config.std), STD)
  with pytest.raises(ValueError, match='std must be 3 numbers'):
    PSPNetConfig(std=(1.0, 0.0, 1.0))


def _one_step(ckpt, step, tx, metrics=None):
  """Saves step ``step`` (every weight = step) and waits for it."""
  import jax.numpy as jnp

  variables = {'params': {'w': jnp.full((3,), float(step))}}
  ckpt.save(
    step,
    model_variables=variables,
    opt_state=tx.init(variables['params']),
    meta={'step': step},
    data_state={'step': step, 'seed': 7},
    metrics=metrics,
  )
  ckpt.wait()


def _targets(tx):
  import jax.numpy as jnp

  target = {'params': {'w': jnp.zeros((3,))}}
  return {'model_target': target, 'opt_target': tx.init(target['params'])}


def test_the_data_state_is_one_file_and_the_older_per_process_files_still_read(tmp_path):
  """A step holds the pipeline's state once (``data_state``), whatever the process count.
  A step written before, with grain's ``data/process_<i>-of-<n>.json``, restores too, also
  when another process count wrote it (the state is the same on every process)."""
  import optax

  tx = optax.sgd(0.1)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), PSPNetConfig(depth=18))
  _one_step(ckpt, 3, tx)
  step_dir = tmp_path / 'checkpoints' / '3'
  assert (step_dir / 'data_state').is_dir() and not (step_dir / 'data').exists()
  assert ckpt.restore(3, **_targets(tx))[3] == {'step': 3, 'seed': 7}
  # The layout of before: no data_state item, one file per process of a 2-process run.
  shutil.rmtree(step_dir / 'data_state')
  os.makedirs(step_dir / 'data')
  (step_dir / 'data' / 'process_1-of-2.json').write_text(json.dumps({'step': 3, 'seed': 8}))
  model, _, meta, data_state = ckpt.restore(3, **_targets(tx))
  assert data_state == {'step': 3, 'seed': 8} and meta == {'step': 3}
  np.testing.assert_array_equal(np.asarray(model['params']['w']), [3.0, 3.0, 3.0])
  ckpt.close()


def test_a_failure_outside_the_files_leaves_every_step_as_it_is(tmp_path, monkeypatch):
  """Restoring the newest step fails. For want of permission or memory: one line saying
  the files are not at fault, and no step is set aside. For a missing file: the step is
  damaged, set aside as <step>.damaged, and the step before it restores."""
  import errno

  import optax

  tx = optax.sgd(0.1)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), PSPNetConfig(depth=18))
  for step in (1, 2):
    _one_step(ckpt, step, tx)
  real = ckpt.manager.restore

  def failing(error):
    def restore(step, **kw):
      if step == 2:
        raise RuntimeError('orbax failed') from error
      return real(step, **kw)

    return restore

  for error in (PermissionError(errno.EACCES, 'Permission denied'), MemoryError()):
    monkeypatch.setattr(ckpt.manager, 'restore', failing(error))
    with pytest.raises(checkpoint.CheckpointError) as e:
      ckpt.restore_newest_intact(**_targets(tx))
    assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
    assert 'cannot restore step 2' in str(e.value) and 'no fault of its files' in str(e.value)
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  monkeypatch.setattr(ckpt.manager, 'restore', failing(FileNotFoundError('d/6731e1: gone')))
  step, model, *_ = ckpt.restore_newest_intact(**_targets(tx))
  assert step == 1 and float(model['params']['w'][0]) == 1.0
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2.damaged']
  ckpt.close()


def test_processes_agree_on_the_step_a_failure_on_one_fails_all(tmp_path, monkeypatch, capsys):
  """newest_intact(all_processes=True) as process 0 of 2, the other process's outcomes
  stubbed: step 3 restores here but is damaged there, so both skip it and take step 2;
  a failure outside the files there (code 2) stops this process too, with one line, also
  when the step is damaged here."""
  other = {3: 1, 2: 0}  # step -> the other process's outcome: 0 restored, 1 damaged, 2 failed
  attempts = []
  # mesh.per_process, the gather of one value per process, as 2 processes would answer it.
  monkeypatch.setattr(
    checkpoint, 'per_process', lambda code: np.asarray([code, other[attempts[-1]]], np.int32)
  )
  restore = lambda step: attempts.append(step) or f'variables of {step}'
  assert checkpoint.newest_intact(str(tmp_path), [2, 3], restore, all_processes=True) == (
    2,
    'variables of 2',
  )
  assert attempts == [3, 2] and 'does not restore on process(es) 1' in capsys.readouterr().err
  # Without agreement this process would have taken step 3 alone.
  assert checkpoint.newest_intact(str(tmp_path), [2, 3], restore)[0] == 3
  other[3] = 2
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.newest_intact(str(tmp_path), [2, 3], restore, all_processes=True)
  assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
  assert 'does not restore on process(es) 1' in str(e.value)

  # Damaged here, failed there: this process stops too (the other will not try step 2).
  def damaged_here(step):
    attempts.append(step)
    raise checkpoint.DamagedCheckpoint(f'step {step}: truncated')

  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.newest_intact(str(tmp_path), [2, 3], damaged_here, all_processes=True)
  assert not isinstance(e.value, checkpoint.DamagedCheckpoint) and attempts[-1] == 3
