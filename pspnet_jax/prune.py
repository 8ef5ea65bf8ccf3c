"""Structured channel pruning: whole output channels of a conv, with its BN and the matching
input channels of the conv that reads them, are removed from a trained model.

  python -m pspnet_jax.prune MODEL_DIR --out DIR --ratio R [--criterion l1|bn-gamma] \\
      [--layers inner|all]

Which convs (``--layers``); each is followed by its BN and a ReLU, and its output reaches
exactly one other conv and no residual sum, so its channels can go without touching a
shortcut (for a MobileNetV2 or ShuffleNetV2 PSPNet, only the heads and the pyramid: their
backbones' convs stay whole, and the head is most of such a model's work, e.g. ~116 of
ShuffleNetV2 PSPNet's 125 GFLOP at 512x512 are ``cls.0``):
- ``inner`` (default): the inner convs of every residual block (``conv1`` and ``conv2`` of a
  ResNet-50/101/152 bottleneck, ``conv1`` of a ResNet-18/34 basic block) and the heads'
  bottlenecks ``cls.0`` and ``aux.0`` (with ``cls.1`` / ``aux.1``);
- ``all``: those, the deep stems' first two convs (``layer0.0``, ``layer0.3``; the
  ``torchvision`` stem has one conv, which feeds layer1's shortcut) and the pyramid branches'
  1x1 convs (``ppm.features.{i}.1``, whose outputs the concatenation hands to ``cls.0``).

Each conv keeps ``max(1, floor((1 - R) * C + 0.5))`` of its ``C`` channels, ranked on their
own: by the L1 norm of the output filter (``l1``, Li et al., ICLR 2017) or by the magnitude
of the BN scale (``bn-gamma``, network slimming: Liu et al., ICCV 2017); the kept channels
stay in their order. The result is an ordinary model directory whose ``model_config.json``
lists the new widths (``PSPNetConfig.widths``); fine-tune it with
``train.py --config.init_checkpoint=DIR``.

What pruning computes: the pruned network's output is the original's with the removed
channels set to zero after their BN+ReLU (``tests/test_prune.py`` checks it in eval and
train mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, errors, output_dir
from pspnet_jax.errors import UserError
from pspnet_jax.models import PSPNet
from pspnet_jax.models.resnet import Bottleneck

CRITERIA = ('l1', 'bn-gamma')
LAYER_SETS = ('inner', 'all')


@dataclasses.dataclass(frozen=True)
class Unit:
  """A prunable conv: its path, its BN's, the conv that reads its output and where those
  channels begin among that conv's inputs."""

  conv: str
  bn: str
  reader: str
  offset: int = 0


def prunable(model: PSPNet, layers: str = 'inner') -> list[Unit]:
  """The convs ``--layers`` names (module docstring), in the network's order: for a ResNet
  backbone its own and the heads', for the light backbones the heads' alone."""
  config = model.config
  if layers not in LAYER_SETS:
    raise UserError(f'--layers must be one of {LAYER_SETS}, got {layers!r}')
  units = []
  if layers == 'all' and config.backbone == 'resnet' and config.stem != 'torchvision':
    units += [Unit(f'backbone.layer0.{i}', f'backbone.layer0.{i + 1}', f'backbone.layer0.{i + 3}')
              for i in (0, 3)]  # fmt: skip
  for k in range(1, 5) if config.backbone == 'resnet' else ():
    for i, block in enumerate(getattr(model.backbone, f'layer{k}')):
      p = f'backbone.layer{k}.{i}'
      units.append(Unit(f'{p}.conv1', f'{p}.bn1', f'{p}.conv2'))
      if isinstance(block, Bottleneck):
        units.append(Unit(f'{p}.conv2', f'{p}.bn2', f'{p}.conv3'))
  if layers == 'all':
    offset = model.backbone.out_channels[3]  # the concatenation is [c4, branch_0, ...]
    for i, branch in enumerate(model.ppm['features']):
      units.append(Unit(f'ppm.features.{i}.1', f'ppm.features.{i}.2', 'cls.0', offset))
      offset += branch['1'].out_features
  return units + [Unit('cls.0', 'cls.1', 'cls.4'), Unit('aux.0', 'aux.1', 'aux.4')]


def slimming_mask(params):
  """True at the BN scales (``weight``) of the convs ``--layers inner`` prunes, False
  elsewhere, over any tree keyed like the model (an nnx ``State``, a pure dict): where
  ``optimizer.bn_l1`` puts network slimming's sparsity penalty. A bottleneck is a block with
  a ``conv3``."""
  paths = [dotted_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  bottlenecks = {p.rsplit('.conv3.', 1)[0] for p in paths if '.conv3.' in p}

  def penalised(path):
    parts = path.split('.')
    if parts[-1] != 'weight':
      return False
    if parts[0] in ('cls', 'aux'):
      return parts[1:] == ['1', 'weight']
    block = '.'.join(parts[:-2])
    return (
      parts[0] == 'backbone'
      and parts[1] != 'layer0'
      and (parts[-2] == 'bn1' or (parts[-2] == 'bn2' and block in bottlenecks))
    )

  return jax.tree_util.tree_map_with_path(lambda p, _: penalised(dotted_path(p)), params)


def dotted_path(path) -> str:
  """A tree path as the model's dotted parameter path (nnx's trailing ``value`` dropped)."""
  keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  return '.'.join(keys[:-1] if keys[-1] == 'value' else keys)


def kept_count(channels: int, ratio: float) -> int:
  return max(1, math.floor((1 - ratio) * channels + 0.5))


def channel_scores(variables: dict, unit: Unit, criterion: str) -> np.ndarray:
  """[C] the importance of each output channel of ``unit.conv``."""
  if criterion == 'l1':
    return np.abs(np.asarray(_at(variables, unit.conv)['kernel'])).sum(axis=(0, 1, 2))
  if criterion == 'bn-gamma':
    return np.abs(np.asarray(_at(variables, unit.bn)['weight']))
  raise UserError(f'--criterion must be one of {CRITERIA}, got {criterion!r}')


def prune_model(
  model: PSPNet, ratio: float, *, criterion: str = 'l1', layers: str = 'inner'
) -> tuple[PSPNet, dict]:
  """(pruned model, {conv path: (channels before, after)}). The model is in the mode
  ``model`` is in; ``model`` itself is unchanged."""
  if not 0 <= ratio < 1:
    raise UserError(f'--ratio {ratio}: give the fraction of channels to remove, in [0, 1)')
  units = prunable(model, layers)
  variables = jax.tree.map(np.asarray, checkpoint.model_variables(model))
  reader_keep = {}  # reader conv -> [C_in] bool: which of its inputs stay
  widths, changes = dict(model.config.widths), {}
  for unit in units:
    scores = channel_scores(variables, unit, criterion)
    n = kept_count(len(scores), ratio)
    keep = np.sort(np.argsort(-scores, kind='stable')[:n])
    conv, bn = _at(variables, unit.conv), _at(variables, unit.bn)
    conv['kernel'] = conv['kernel'][..., keep]
    if 'bias' in conv:
      conv['bias'] = conv['bias'][keep]
    for name in bn:
      bn[name] = bn[name][keep]
    reader = _at(variables, unit.reader)['kernel']
    mask = reader_keep.setdefault(unit.reader, np.ones(reader.shape[2], bool))
    mask[unit.offset : unit.offset + len(scores)] = False
    mask[unit.offset + keep] = True
    widths[unit.conv] = n
    changes[unit.conv] = (len(scores), n)
  for path, mask in reader_keep.items():
    reader = _at(variables, path)
    reader['kernel'] = reader['kernel'][:, :, mask, :]
  config = dataclasses.replace(model.config, widths=_non_default(model.config, widths))
  pruned = checkpoint.abstract_model(config)
  graphdef, state = nnx.split(pruned)
  expected = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(state))
  got = jax.tree.map(lambda a: a.shape, variables)
  assert got == expected, 'pruned variables do not fit the pruned config'  # a bug, not input
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, variables))
  pruned = nnx.merge(graphdef, state)
  pruned.eval() if model.deterministic else pruned.train()
  return pruned, changes


def parameter_count(model: PSPNet) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _non_default(config, widths: dict[str, int]) -> dict[str, int]:
  """``widths`` without the entries that equal the unpruned architecture's."""
  base = checkpoint.model_variables(
    checkpoint.abstract_model(dataclasses.replace(config, widths=()))
  )
  return {p: n for p, n in widths.items() if _at(base, p)['kernel'].shape[-1] != n}


def _at(tree: dict, path: str) -> dict:
  """The sub-dict of a variables tree at a dotted path (list indices are ints there)."""
  for key in path.split('.'):
    tree = tree[key] if key in tree else tree[int(key)]
  return tree


def _ratio(text: str) -> float:
  try:
    ratio = float(text)
  except ValueError:
    ratio = math.nan
  if not 0 <= ratio < 1:  # NaN fails too
    raise UserError(
      f'--ratio {text}: give the fraction of channels to remove, a number in [0, 1) '
      '(nothing was written)'
    )
  return ratio


@errors.command
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog='python -m pspnet_jax.prune',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument(
    'model_dir', help='model directory, training workdir or workdir/checkpoints/<step>'
  )
  ap.add_argument('--out', required=True, help='the pruned model directory to write')
  ap.add_argument(
    '--ratio', required=True, help="fraction of each pruned conv's channels to remove, [0, 1)"
  )
  ap.add_argument('--criterion', default='l1', choices=CRITERIA)
  ap.add_argument('--layers', default='inner', choices=LAYER_SETS)
  args = ap.parse_args(argv)
  ratio = _ratio(args.ratio)
  source = os.path.abspath(args.model_dir)
  metadata = checkpoint.model_metadata(source)
  # A workdir's step directory keeps its config two levels up.
  has_config = os.path.exists(os.path.join(source, checkpoint.MODEL_CONFIG))
  config_dir = source if has_config else os.path.dirname(os.path.dirname(source))
  out = output_dir.claim(
    args.out,
    marker=checkpoint.MODEL_CONFIG,
    what='model directory',
    writes=(checkpoint.MODEL_CONFIG, checkpoint.STATE_DIR),
    protect=(
      os.path.join(config_dir, checkpoint.MODEL_CONFIG),
      os.path.join(source, checkpoint.STATE_DIR),
    ),
  )
  model = checkpoint.load_model(source)
  pruned, changes = prune_model(model, ratio, criterion=args.criterion, layers=args.layers)
  record = {
    'source': source,
    'ratio': ratio,
    'criterion': args.criterion,
    'layers': args.layers,
    'parameters': [parameter_count(model), parameter_count(pruned)],
  }
  checkpoint.save_model(out, pruned, {**metadata, 'pruning': record})
  before, after = (sum(c[i] for c in changes.values()) for i in (0, 1))
  print(
    f'pruned {len(changes)} convs ({args.criterion}, --layers {args.layers}): {after} of '
    f'{before} channels kept; parameters {record["parameters"][0]:,} -> '
    f'{record["parameters"][1]:,}'
  )
  print(f'wrote: {out} (fine-tune: train.py --config.init_checkpoint={out})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
