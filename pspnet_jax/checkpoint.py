"""The one module that reads and writes checkpoints (orbax). Nobody else touches the format.

A *model directory* holds one model: ``model_config.json`` (``PSPNetConfig``) and
``state/`` (an orbax checkpoint of the model's parameters and BN statistics as a nested
dict of arrays, keyed like ``nnx.to_pure_dict``). The port CLI writes one; training
workdirs get one per saved step (see ``pspnet_jax.train_lib``) and ``load_model`` reads any
of them.
"""

from __future__ import annotations

import json
import os
import orbax.checkpoint as ocp
from flax import nnx

from pspnet_jax.models import PSPNet, PSPNetConfig

MODEL_CONFIG = 'model_config.json'
STATE_DIR = 'state'


class CheckpointError(ValueError):
  """A path is not a checkpoint this project can read; the message says what was found."""


def model_variables(model: PSPNet) -> dict:
  """Parameters and BN statistics as a nested dict of arrays (what is saved)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def abstract_model(config: PSPNetConfig) -> PSPNet:
  """A PSPNet whose arrays are ShapeDtypeStructs: no initialisation cost."""
  return nnx.eval_shape(lambda: PSPNet(config, rngs=nnx.Rngs(0)))


def create_model(config: PSPNetConfig, seed: int = 0) -> PSPNet:
  """A freshly initialised PSPNet; initialisation runs as one compiled program."""
  return nnx.jit(lambda: PSPNet(config, rngs=nnx.Rngs(seed)))()


def save_model(directory: str | os.PathLike, model: PSPNet, metadata: dict | None = None) -> str:
  """Writes a model directory; returns its absolute path."""
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, STATE_DIR), model_variables(model), force=True)
    ckptr.wait_until_finished()
  write_model_config(directory, model.config, metadata)
  return directory


def write_model_config(directory: str, config: PSPNetConfig, metadata: dict | None = None):
  payload = {'model': config.to_dict(), **({'metadata': metadata} if metadata else {})}
  tmp = os.path.join(directory, MODEL_CONFIG + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MODEL_CONFIG))


def read_model_config(directory: str) -> tuple[PSPNetConfig, dict]:
  path = os.path.join(directory, MODEL_CONFIG)
  try:
    with open(path) as f:
      payload = json.load(f)
    return PSPNetConfig.from_dict(payload['model']), payload.get('metadata', {})
  except FileNotFoundError:
    raise CheckpointError(f'{directory}: no {MODEL_CONFIG}; not a pspnet_jax model directory') from None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: unreadable model config ({e})') from None


def restore_variables(state_dir: str, config: PSPNetConfig) -> PSPNet:
  """Builds a PSPNet of ``config`` holding the variables saved in orbax dir ``state_dir``."""
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  target = nnx.to_pure_dict(state)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, target)
  except Exception as e:  # orbax raises many types; name the path and the cause
    raise CheckpointError(f'{state_dir}: cannot restore model variables for {config}: {e}') from e
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def load_model(path: str | os.PathLike) -> PSPNet:
  """Loads a model directory (port CLI output, or one step of a training run).

  Training workdirs are resolved by ``pspnet_jax.train_lib`` to their latest step's model
  directory before calling this.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such directory')
  config, _ = read_model_config(path)
  return restore_variables(os.path.join(path, STATE_DIR), config)

