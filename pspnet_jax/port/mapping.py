"""The one mapping between PSPNet's NNX state and the semseg PyTorch state-dict layout.

Every other PyTorch layout (mmseg, torchvision, semseg ImageNet) is first renamed to this
canonical layout by its own module in ``pspnet_jax.port``; only this module knows how a
canonical key becomes an NNX variable.

The NNX modules are named after the semseg keys, so the rule is short:
- drop the leading ``backbone.`` (semseg's PSPNet holds ``layer0..layer4`` at top level);
- ``<conv>.kernel`` [kh, kw, in, out] is ``<conv>.weight`` [out, in, kh, kw];
- everything else (BN ``weight``, ``bias``, ``running_mean``, ``running_var``; conv
  ``bias``) keeps its name and shape.

Arrays are NumPy here; nothing in this module imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax.errors import UserError

BACKBONE_PREFIX = 'backbone.'


class PortError(UserError):
  """A foreign checkpoint cannot be ported; the message names the file or key and what to do."""


class StateDictMismatch(PortError):
  """A state dict does not fit the model; the message lists every offending key."""


def torch_key(path: Iterable) -> str:
  """NNX path -> semseg key, e.g. ``('backbone','layer1',0,'conv1','kernel')`` -> ``layer1.0.conv1.weight``."""
  key = '.'.join(str(p) for p in path)
  if key.startswith(BACKBONE_PREFIX):
    key = key[len(BACKBONE_PREFIX) :]
  if key.endswith('.kernel'):
    key = key[: -len('kernel')] + 'weight'
  return key


def _is_conv_kernel(path) -> bool:
  return str(path[-1]) == 'kernel'


def to_torch_layout(path, value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (3, 2, 0, 1)) if _is_conv_kernel(path) else value


def from_torch_layout(path, value: np.ndarray) -> np.ndarray:
  return np.transpose(value, (2, 3, 1, 0)) if _is_conv_kernel(path) else value


def _variables(model: nnx.Module, prefix: str | None):
  """(path, variable) for every Param and BatchStat, optionally only under a key prefix."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    if prefix is None or '.'.join(map(str, path)).startswith(prefix):
      out.append((path, var))
  return out


def expected_keys(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Canonical key -> PyTorch shape of every parameter and BN statistic of ``model``."""
  return {torch_key(p): _torch_shape((p, v)) for p, v in _variables(model, None)}


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's variables as a semseg-layout state dict of float32 NumPy arrays."""
  return {
    torch_key(p): np.asarray(to_torch_layout(p, np.asarray(v.get_value())))
    for p, v in _variables(model, None)
  }


def load_state_dict(
  model: nnx.Module,
  state_dict: Mapping[str, np.ndarray],
  *,
  only: str | None = None,
  skip: str | None = None,
  source: str = 'state dict',
  source_names: Mapping[str, str] | None = None,
) -> list[str]:
  """Copies a canonical (semseg-layout) state dict into ``model``, strictly.

  ``only``: restrict the target to variables whose NNX path starts with it (``'backbone'``
  for a backbone-only port); ``skip``: leave out those whose path starts with it (``'aux'``
  for a file without an auxiliary head). The rest keep their initial values.
  Every source key must fill exactly one target and every target must be filled, with
  matching shapes; otherwise one ``StateDictMismatch`` lists all problems at once.
  ``source_names``: canonical key -> the key in the file it was renamed from, so that the
  error names the keys the user can find in their file.
  Returns the list of keys filled.
  """
  names = source_names or {}

  def name(key):
    return f'{key} (file key {names[key]})' if names.get(key, key) != key else key

  targets = {
    torch_key(p): (p, v)
    for p, v in _variables(model, only)
    if skip is None or not '.'.join(map(str, p)).startswith(skip)
  }
  missing = sorted(set(targets) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(targets))
  misshaped = []
  for key in sorted(set(targets) & set(state_dict)):
    want = _torch_shape(targets[key])
    got = tuple(np.shape(state_dict[key]))
    if want != got:
      misshaped.append(f'  {name(key)}: {source} has {got}, model expects {want}')
  if missing or unexpected or misshaped:
    lines = [f'{source} does not fit the model:']
    if missing:
      lines.append(f'missing keys ({len(missing)}):')
      lines += [f'  {k}: model expects {_torch_shape(targets[k])}' for k in missing]
    if unexpected:
      lines.append(f'unexpected keys ({len(unexpected)}):')
      lines += [
        f'  {name(k)}: {tuple(np.shape(state_dict[k]))}, the model has no such key'
        for k in unexpected
      ]
    if misshaped:
      lines.append(f'mis-shaped keys ({len(misshaped)}):')
      lines += misshaped
    raise StateDictMismatch('\n'.join(lines))
  for key, (path, var) in targets.items():
    value = from_torch_layout(path, np.asarray(state_dict[key], dtype=np.float32))
    # set_value, not var[...] =: the model may be abstract (ShapeDtypeStruct leaves, see
    # checkpoint.abstract_model), and a whole replacement skips a copy of every tensor.
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
  return sorted(targets)


def _torch_shape(target) -> tuple[int, ...]:
  path, var = target
  shape = tuple(var.get_value().shape)
  return (shape[3], shape[2], shape[0], shape[1]) if _is_conv_kernel(path) else shape
