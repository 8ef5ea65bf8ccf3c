"""Model directories: save -> load round trip and clear errors for non-checkpoints."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNetConfig


def test_save_load_round_trip_is_exact(tmp_path):
  cfg = PSPNetConfig(depth=18, num_classes=5, base_width=16, stem='deep32', align_corners=False)
  model = checkpoint.create_model(cfg, seed=3)
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
  (tmp_path / 'bad' / 'model_config.json').write_text(json.dumps({'model': {'depth': 50, 'colour': 1}}))
  with pytest.raises(checkpoint.CheckpointError, match='colour'):
    checkpoint.load_model(tmp_path / 'bad')
  (tmp_path / 'bad' / 'model_config.json').write_text(json.dumps({'model': {'depth': 18}}))
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore'):
    checkpoint.load_model(tmp_path / 'bad')
