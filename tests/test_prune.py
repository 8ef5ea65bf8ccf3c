"""Structured channel pruning (pspnet_jax/prune.py): what the pruned network computes, stated
independently (the original with the removed channels zeroed after their BN+ReLU), ratio 0,
the CLI's refusals, and a pruned model fine-tuned by train.py and evaluated by eval.py."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_run
from cli import ROOT, cli_env
from flax import nnx
from tiny_models import TINY, random_model, scaled_random_model, tiny_model

from pspnet_jax import checkpoint, prune
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.train import OptimizerConfig, make_optimizer

X = np.random.default_rng(0).standard_normal((2, 33, 33, 3)).astype(np.float32)


def _zeroed_reference(model, pruned, criterion):
  """A copy of ``model`` whose channels that ``pruned`` lacks output 0 after BN+ReLU (BN
  scale and bias 0). The removed channels are found here from the criterion's definition:
  each pruned conv keeps the ``n`` channels of largest filter L1 norm (or |BN gamma|),
  ``n`` being its width in ``pruned.config.widths``."""
  ref = nnx.clone(model)
  for path, n in pruned.config.widths:
    conv = _module(ref, path)
    bn = _module(ref, path[: path.rindex('.') + 1] + _bn_name(path))
    if criterion == 'l1':
      score = np.abs(np.asarray(conv.kernel[...])).sum(axis=(0, 1, 2))
    else:
      score = np.abs(np.asarray(bn.weight[...]))
    removed = np.argsort(score)[: len(score) - n]
    for name in ('weight', 'bias'):
      value = np.asarray(getattr(bn, name)[...]).copy()
      value[removed] = 0
      getattr(bn, name)[...] = value
  return ref


def _bn_name(conv_path):
  """The BN after a conv: conv1 -> bn1; Sequential index i -> i + 1."""
  last = conv_path.rsplit('.', 1)[1]
  return f'bn{last[-1]}' if last.startswith('conv') else str(int(last) + 1)


def _module(model, path):
  for key in path.split('.'):
    model = model[int(key)] if isinstance(model, nnx.List) else (
      model[key] if isinstance(model, nnx.Dict) else getattr(model, key)
    )  # fmt: skip
  return model


@nnx.jit
def _forward(model, x):
  return model(x)


def _assert_same(a, b, tolerance=1e-5):
  """Equal to float32 precision: within ``tolerance`` of the largest logit."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * np.abs(b).max())


@pytest.mark.parametrize(
  'config,criterion,layers,expected',
  [
    # ResNet-18: one inner conv per basic block (8) + cls.0 + aux.0; ratio 0.5.
    (dataclasses.replace(TINY, dropout=0.0), 'l1', 'inner', 10),
    # ResNet-50: conv1 and conv2 of 16 bottlenecks + cls.0 + aux.0; + stem 2 + ppm 4.
    (dataclasses.replace(TINY, depth=50, dropout=0.0), 'bn-gamma', 'all', 40),
    # MobileNetV2: the heads and the pyramid only (its 320 channels into 4 branches of 16).
    (
      dataclasses.replace(TINY, backbone='mobilenet_v2', ppm_channels=16, dropout=0.0),
      'l1',
      'all',
      6,
    ),
  ],
  ids=['resnet18-l1-inner', 'resnet50-bn_gamma-all', 'mobilenet_v2-l1-all'],
)
def test_pruned_output_is_the_original_with_removed_channels_zeroed(
  config, criterion, layers, expected
):
  model = tiny_model(config) if config.backbone == 'resnet' else scaled_random_model(config, 1)
  model.eval()
  pruned, changes = prune.prune_model(model, 0.5, criterion=criterion, layers=layers)
  assert len(changes) == expected and len(pruned.config.widths) == expected
  assert all(after == max(1, int(before / 2 + 0.5)) for before, after in changes.values())
  assert all(not p.startswith('backbone.') for p in changes) or config.backbone == 'resnet'
  cut = prune.parameter_count(model) - prune.parameter_count(pruned)
  assert cut > (0.3 * prune.parameter_count(model) if config.backbone == 'resnet' else 8000)
  ref = _zeroed_reference(model, pruned, criterion)
  assert pruned.deterministic and ref.deterministic  # eval mode: logits only
  pruned_logits, ref_logits = _forward(pruned, X), _forward(ref, X)
  _assert_same(pruned_logits, ref_logits)
  assert np.abs(np.asarray(_forward(model, X)) - np.asarray(ref_logits)).max() > 1e-2  # it bites
  # Train mode: BN on batch statistics (the kept channels' are unchanged), both heads. Those
  # of the deep layers' 2x5x5 batches amplify the rounding of the shorter sums (8e-5 seen): 3e-4.
  pruned.train(), ref.train()
  for a, b in zip(_forward(pruned, X), _forward(ref, X)):
    _assert_same(a, b, 3e-4)


def test_ratio_zero_returns_the_same_model_bitwise():
  model = tiny_model()
  pruned, changes = prune.prune_model(model, 0.0, layers='all')
  assert pruned.config == model.config and pruned.config.widths == ()
  assert all(before == after for before, after in changes.values())
  a, b = checkpoint.model_variables(model), checkpoint.model_variables(pruned)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_widths_round_trip_and_unknown_paths_are_refused():
  config = dataclasses.replace(TINY, widths=[['cls.0', 3], ['backbone.layer2.1.conv1', 2]])
  assert config.widths == (('backbone.layer2.1.conv1', 2), ('cls.0', 3))
  assert PSPNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  model = checkpoint.abstract_model(config)
  assert model.cls['0'].kernel.shape[-1] == 3 and model.cls['4'].kernel.shape[2] == 3
  assert model.backbone.layer2[1].conv2.kernel.shape[2] == 2
  for widths in ([('backbone.layer2.1.conv2', 2)], [('cls.9', 2)], [('cls.0', 0)]):
    with pytest.raises(ValueError, match='widths'):
      checkpoint.abstract_model(dataclasses.replace(TINY, widths=widths))


def _main(capsys, *argv):
  with pytest.raises(SystemExit) as exit_:
    prune.main([str(a) for a in argv])
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
  model_dir = checkpoint.save_model(tmp_path / 'model', tiny_model())
  (tmp_path / 'file').write_text('x')
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'notes.txt').write_text('x')
  out = tmp_path / 'out'
  assert 'not a pspnet_jax model' in _main(capsys, tmp_path / 'busy', '--out', out, '--ratio', 0.3)
  for ratio in ('1', '-0.1', 'nan', 'half'):
    assert '[0, 1)' in _main(capsys, model_dir, '--out', out, '--ratio', ratio)
  assert 'is a file' in _main(capsys, model_dir, '--out', tmp_path / 'file', '--ratio', 0.3)
  assert 'other files' in _main(capsys, model_dir, '--out', tmp_path / 'busy', '--ratio', 0.3)
  assert 'replace the input' in _main(capsys, model_dir, '--out', model_dir, '--ratio', 0.3)
  assert not out.exists() and os.listdir(tmp_path / 'busy') == ['notes.txt']


def test_cli_prunes_the_trained_run_and_train_py_fine_tunes_it(reference_run, data_dir, tmp_path):
  """The shared tiny run pruned at 0.5 by the CLI, fine-tuned 4 steps by train.py from
  --config.init_checkpoint (the widths come from its config), then eval.py on it."""
  workdir, _ = reference_run
  pruned_dir = tmp_path / 'pruned'
  p = subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.prune', str(workdir), '--out', str(pruned_dir)]
    + ['--ratio', '0.5', '--criterion', 'bn-gamma'],
    env=cli_env(), capture_output=True, text=True, cwd=ROOT, timeout=300,
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  config, metadata = checkpoint.read_model_config(str(pruned_dir))
  assert dict(config.widths)['cls.0'] == 8 and metadata['pruning']['ratio'] == 0.5
  assert metadata['dataset'] == checkpoint.model_metadata(workdir)['dataset']
  tuned = tmp_path / 'tuned'
  tiny_run.train(
    tuned,
    data_dir,
    f'--config.init_checkpoint={pruned_dir}',
    '--config.num_steps=4',
    '--config.checkpoint_every_steps=4',
  )
  assert checkpoint.model_config(tuned) == config
  out = tmp_path / 'eval'
  p = subprocess.run(
    [sys.executable, 'eval.py', '--config', 'configs/synthetic.py', '--workdir', str(tuned)]
    + ['--out', str(out), f'--config.dataset.data_dir={data_dir}']
    + ['--config.dataset.builder_kwargs.image_size=32', '--config.eval.crop_size=33']
    + ['--config.eval.base_size=32'],
    env=cli_env(), capture_output=True, text=True, cwd=ROOT, timeout=300,
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  metrics = json.load(open(out / 'metrics.json'))
  assert metrics['images'] == 8 and 0 <= metrics['miou'] <= 1


@pytest.mark.parametrize('depth', [18, 50])
def test_bn_l1_penalises_exactly_the_gammas_of_the_pruned_convs(depth):
  """optimizer.bn_l1: with zero gradients and plain SGD, one update moves the BN scales of
  the convs ``--layers inner`` prunes by ``-lr * bn_l1 * sign(gamma)`` (the heads' at their
  10x rate) and nothing else."""
  model = random_model(dataclasses.replace(TINY, depth=depth))
  params = nnx.state(model, nnx.Param)
  expected = {f'{u.bn}.weight' for u in prune.prunable(model)}
  mask = jax.tree_util.tree_leaves_with_path(prune.slimming_mask(params))
  assert {prune.dotted_path(p) for p, m in mask if m} == expected
  config = OptimizerConfig(learning_rate=0.1, momentum=0.0, weight_decay=0.0, bn_l1=0.01)
  tx = make_optimizer(config, total_steps=10)
  grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {}
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
    name = prune.dotted_path(path)
    rate = 1.0 if name.startswith(('cls', 'aux')) else 0.1
    want = -rate * 0.01 * np.sign(p) if name in expected else np.zeros_like(p)
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=0)
    moved[name] = bool(np.any(u != 0))
  assert {n for n, m in moved.items() if m} == expected
