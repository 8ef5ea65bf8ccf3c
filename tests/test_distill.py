"""Distillation. The losses against NumPy formulas written here: channel-wise distillation
(Shu et al. ICCV 2021, as mmrazor's ChannelWiseDivergence computes it: N*C spatial
distributions) and the pixel-wise KL over labelled positions; tau != 1, ignored positions,
and gradients (the teacher gets none; the student's equals a finite difference). The train
step with a teacher: its term is the formula on the teacher's logits under the teacher's own
normalisation, the teacher's weights stay bit-identical and get no optimizer state,
accumulation weighs the cross entropy as without a teacher, 4 devices equal 1. train.py
distils from a model directory and refuses another teacher on resume; the AOT tool lowers the
step the loop runs."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_env, one_error_line
from flax import nnx
from tiny_models import tiny_model

from configs.semseg_recipe import base_config
from pspnet_jax import checkpoint
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.train import distill
from pspnet_jax.train.distill import channel_wise_divergence, pixel_kl
from pspnet_jax.train.state import create_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def cwd_numpy(student, teacher, tau):
  """mmrazor: reshape [N, C, H, W] to [N*C, H*W], softmax over H*W of x / tau,
  sum(pT * (log pT - log pS)) * tau^2 / (N * C)."""
  n, h, w, c = student.shape
  s = np.transpose(student, (0, 3, 1, 2)).reshape(n * c, h * w).astype(np.float64) / tau
  t = np.transpose(teacher, (0, 3, 1, 2)).reshape(n * c, h * w).astype(np.float64) / tau
  pt, ps = _softmax(t, 1), _softmax(s, 1)
  return float(np.sum(pt * (np.log(pt) - np.log(ps))) * tau**2 / (n * c))


def pixel_kl_numpy(student, teacher, mask, tau):
  pt = _softmax(teacher.astype(np.float64) / tau, -1)
  ps = _softmax(student.astype(np.float64) / tau, -1)
  kl = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  return float(tau**2 * kl[mask].mean()) if mask.any() else 0.0


@pytest.mark.parametrize('tau', [1.0, 2.5])
def test_both_losses_equal_their_numpy_formulas(tau):
  rng = np.random.default_rng(0)
  student = rng.normal(0, 3, (2, 7, 9, 5)).astype(np.float32)
  teacher = rng.normal(0, 3, (2, 7, 9, 5)).astype(np.float32)
  mask = rng.random((2, 7, 9)) > 0.3
  got = float(channel_wise_divergence(jnp.asarray(student), jnp.asarray(teacher), tau))
  assert got == pytest.approx(cwd_numpy(student, teacher, tau), rel=1e-5)
  got = float(pixel_kl(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), tau))
  assert got == pytest.approx(pixel_kl_numpy(student, teacher, mask, tau), rel=1e-5)
  assert (
    float(pixel_kl(jnp.asarray(student), jnp.asarray(teacher), jnp.zeros((2, 7, 9), bool))) == 0.0
  )
  assert float(
    channel_wise_divergence(jnp.asarray(teacher), jnp.asarray(teacher), tau)
  ) == pytest.approx(0.0, abs=1e-6)


def test_gradients_flow_to_the_student_only():
  rng = np.random.default_rng(1)
  student = jnp.asarray(rng.normal(0, 1, (1, 4, 4, 3)), jnp.float32)
  teacher = jnp.asarray(rng.normal(0, 1, (1, 4, 4, 3)), jnp.float32)
  for loss in (channel_wise_divergence, lambda s, t: pixel_kl(s, t, tau=2.0)):
    g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
    assert float(jnp.abs(g_teacher).max()) == 0.0
    # the student's gradient against a central difference in float64 NumPy
    eps, idx = 1e-3, (0, 1, 2, 1)
    up, down = np.array(student, np.float64), np.array(student, np.float64)
    up[idx] += eps
    down[idx] -= eps
    f = (
      (lambda s: cwd_numpy(s, np.asarray(teacher), 1.0))
      if loss is channel_wise_divergence
      else (lambda s: pixel_kl_numpy(s, np.asarray(teacher), np.ones((1, 4, 4), bool), 2.0))
    )
    assert float(g_student[idx]) == pytest.approx((f(up) - f(down)) / (2 * eps), rel=1e-3, abs=1e-6)


def test_shapes_must_match():
  with pytest.raises(ValueError, match='differ in shape'):
    channel_wise_divergence(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8, 3)))


# Student and teacher: tiny PSPNets on 4 classes; the teacher has its own normalisation.
STUDENT = PSPNetConfig(
  depth=18, base_width=8, num_classes=4, head_channels=16, aux_channels=8, dropout=0.0
)
TEACHER = PSPNetConfig(
  depth=18,
  base_width=16,
  num_classes=4,
  head_channels=16,
  aux_channels=8,
  mean=(100.0, 110.0, 120.0),
  std=(50.0, 60.0, 70.0),
)


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return checkpoint.save_model(tmp_path_factory.mktemp('teacher') / 'model', tiny_model(TEACHER, 1))


def _config(teacher, loss='cwd', tau=1.0, weight=5.0, accum=1):
  c = base_config()
  c.distill.update(teacher=teacher, loss=loss, tau=tau, weight=weight)
  c.grad_accum_steps = accum
  return c


def _trainer(config, teacher):
  """(trainer, initial state) for the tiny student, with the teacher of ``config`` or none."""
  graphdef, params, batch_stats = nnx.split(tiny_model(STUDENT), nnx.Param, nnx.BatchStat)
  d = distill.from_config(config, STUDENT) if teacher else None
  trainer = create_trainer(
    config, graphdef, total_steps=10, ignore_label=255, mesh=mesh_lib.data_mesh(), distill=d
  )
  return trainer, jax.device_put(trainer.initial_state(params, batch_stats, 0), trainer.replicated)


def _batch(seed=0):
  """Raw RGB (0-255) and labels with ignored rows; the student's normalised images."""
  rng = np.random.default_rng(seed)
  rgb = rng.uniform(0, 255, (4, 33, 33, 3)).astype(np.float32)
  labels = rng.integers(0, 4, (4, 33, 33)).astype(np.int32)
  labels[:, :9] = 255
  labels[1, 20:, 5:] = 255
  image = (rgb - np.asarray(STUDENT.mean, np.float32)) / np.asarray(STUDENT.std, np.float32)
  return rgb, {'image': image, 'label': labels}


def _head_logits(config, rgb, *, train):
  """A model's head logits [B, h, w, C] on ``rgb`` under its own normalisation (NumPy)."""
  model = checkpoint.load_model(config) if isinstance(config, str) else tiny_model(config)
  model.train() if train else model.eval()
  cfg = model.config
  x = (rgb - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
  out = model(jnp.asarray(x), upsample=False)
  return np.asarray(out[0] if train else out, np.float64)


@pytest.mark.parametrize('loss,tau', [('cwd', 1.0), ('kl', 2.0)])
def test_distilled_step_adds_the_formula_on_the_teachers_own_view(teacher_dir, loss, tau):
  """The step's distill_loss is weight x the NumPy formula on the student's logits (train
  mode) and the teacher's (inference mode, its own mean/std applied to the same RGB); the
  loss is the cross entropy plus it; after steps the teacher's weights are bit-identical to
  the directory's and the optimizer state is the student's alone."""
  trainer, state = _trainer(_config(teacher_dir, loss, tau, weight=3.0), True)
  rgb, batch = _batch()
  batch = mesh_lib.global_batch(batch, mesh_lib.data_mesh())
  student = _head_logits(STUDENT, rgb, train=True)
  teacher = _head_logits(teacher_dir, rgb, train=False)
  assert student.shape == teacher.shape == (4, 5, 5, 4)
  if loss == 'cwd':
    want = cwd_numpy(student, teacher, tau)
  else:  # the labels at the logits' positions: align_corners puts row i at 8 i of 33
    want = pixel_kl_numpy(student, teacher, _batch()[1]['label'][:, ::8, ::8] != 255, tau)
  opt_state = state['opt_state']
  plain_opt_state = jax.eval_shape(trainer.tx.init, state['params'])  # the student's alone
  state, metrics = trainer.step(state, batch)
  m = {k: float(v) for k, v in metrics.items()}
  assert m['distill_loss'] == pytest.approx(3.0 * want, rel=2e-4)
  assert m['loss'] == pytest.approx(m['main_loss'] + 0.4 * m['aux_loss'] + m['distill_loss'])
  state, _ = trainer.step(state, batch)
  saved = nnx.to_pure_dict(nnx.state(checkpoint.load_model(teacher_dir)))
  kept = nnx.to_pure_dict(nnx.merge_state(*state['teacher'].values()))
  flat_saved = jax.tree_util.tree_leaves_with_path(saved)
  assert len(flat_saved) == len(jax.tree.leaves(kept)) > 50
  for path, leaf in flat_saved:
    got = kept
    for k in path:
      got = got[k.key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf), err_msg=str(path))
  assert jax.tree.structure(state['opt_state']) == jax.tree.structure(plain_opt_state)
  assert jax.tree.structure(opt_state) == jax.tree.structure(plain_opt_state)


def test_accumulated_distilled_step_weighs_the_cross_entropy_as_without_a_teacher(teacher_dir):
  """Two micro-batches, the first without any labelled pixel: with a zero-weight teacher the
  step equals the plain accumulated step (each micro-batch's cross entropy weighted by its
  share of the labelled pixels, the term by 1/2)."""
  _, batch = _batch(1)
  batch['label'][:2, 9:] = 255  # the first micro-batch has no labelled pixel at all
  batch = mesh_lib.global_batch(batch, mesh_lib.data_mesh())
  zero, zero_state = _trainer(_config(teacher_dir, weight=0.0, accum=2), True)
  plain, plain_state = _trainer(_config('', accum=2), False)
  a, ma = zero.step(zero_state, batch)
  b, mb = plain.step(plain_state, batch)
  assert float(ma['loss']) == pytest.approx(float(mb['loss']), rel=1e-6)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert float(ma['distill_loss']) == 0.0  # weight 0: no term


def test_a_micro_batch_without_labelled_pixels_keeps_its_distillation_term(teacher_dir):
  """Two micro-batches, the first without any labelled pixel, from the same state: changing
  the first one's images leaves the cross entropy as it was and still moves the student's
  update (through the term alone; were the term weighted by labelled pixels, as the cross
  entropy is, both updates would be bit-identical: each micro-batch has its own BN batch)."""
  trainer, state = _trainer(_config(teacher_dir, accum=2), True)
  copy = jax.tree.map(jnp.copy, state)  # the step donates its state
  _, batch = _batch(2)
  batch['label'][:2] = 255
  other = dict(batch, image=batch['image'].copy())
  other['image'][:2] = np.random.default_rng(5).standard_normal(other['image'][:2].shape)
  a, ma = trainer.step(state, mesh_lib.global_batch(batch, mesh_lib.data_mesh()))
  b, mb = trainer.step(copy, mesh_lib.global_batch(other, mesh_lib.data_mesh()))
  assert float(ma['main_loss']) == float(mb['main_loss']) > 0
  assert float(ma['distill_loss']) != float(mb['distill_loss'])
  moved = [
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params']))
  ]
  assert sum(m > 1e-6 for m in moved) > len(moved) // 2, moved  # most tensors moved


def test_four_devices_equal_one_device_with_a_teacher(tmp_path, teacher_dir):
  """tests/scripts/one_train_step.py with a teacher on 1 and 4 simulated devices: the same
  parameters and BN statistics after a distilled step."""

  def run(devices):
    out = tmp_path / f'step_{devices}.npz'
    script = os.path.join(ROOT, 'tests', 'scripts', 'one_train_step.py')
    subprocess.run(
      [sys.executable, script, str(out), teacher_dir],
      env=cli_env(devices),
      check=True,
      timeout=300,
    )
    return dict(np.load(out))

  one, four = run(1), run(4)
  assert int(one['__devices']) == 1 and int(four['__devices']) == 4
  assert float(one['__distill_loss']) > 0
  for k in one:
    if not k.startswith('__devices'):
      np.testing.assert_allclose(four[k], one[k], atol=1e-5, rtol=1e-5, err_msg=k)


def _train(workdir, data_dir, *extra):
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    'synthetic',
    '--workdir',
    str(workdir),
    f'--config.dataset.data_dir={data_dir}',
    '--config.dataset.builder_kwargs.image_size=32',
    '--config.dataset.builder_kwargs.num_train=16',
    '--config.dataset.builder_kwargs.num_val=4',
    '--config.model.base_width=8',
    '--config.model.head_channels=16',
    '--config.model.aux_channels=8',
    '--config.augment.crop_size=33',
    '--config.global_batch_size=4',
    '--config.num_steps=4',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    '--config.eval_every_steps=0',
    '--config.eval.crop_size=33',
    '--config.eval.base_size=32',
    *extra,
  ]
  return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=420, cwd=ROOT)


def test_train_py_distils_and_refuses_another_teacher_on_resume(tmp_path, teacher_dir):
  """A student trains from the CLI with a teacher: distill_loss is logged, the workdir
  records the teacher's SHA-256 and its checkpoints hold the student alone. Resuming with
  another teacher, without one, or starting with a teacher of other classes: one line each,
  nothing trained."""
  import json

  data_dir, workdir = tmp_path / 'tfds', tmp_path / 'student'
  p = _train(workdir, data_dir, f'--config.distill.teacher={teacher_dir}')
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  rows = [json.loads(r) for r in open(workdir / 'metrics.jsonl')]
  kd = [r['distill_loss'] for r in rows if r['kind'] == 'train']
  assert len(kd) == 4 and all(np.isfinite(kd)) and min(kd) > 0
  record = json.loads((workdir / 'teacher.json').read_text())
  assert record['path'] == teacher_dir and record['loss'] == 'cwd' and record['weight'] == 5.0
  d = distill.from_config(_config(teacher_dir), STUDENT)
  assert record['sha256'] == d.sha256 == distill.weights_sha256(d.variables)
  run = json.loads((workdir / 'config.json').read_text())  # this start's config, recorded
  assert run['config']['distill']['teacher'] == teacher_dir and run['config']['num_steps'] == 4
  assert run['conv'] == {'backend': 'auto', 'weight_gradient': 'auto', 'overridden_by': []}
  student = checkpoint.load_model(workdir)  # the student's variables, nothing else
  assert student.config.base_width == 8 and checkpoint.model_config(workdir).num_classes == 4

  other = checkpoint.save_model(tmp_path / 'other', tiny_model(TEACHER, 2))
  five = checkpoint.save_model(
    tmp_path / 'five', tiny_model(dataclasses.replace(TEACHER, num_classes=5), 0)
  )
  steps = sorted(os.listdir(workdir / 'checkpoints'))
  for extra, needles in [
    ((f'--config.distill.teacher={other}', '--config.num_steps=6'), ('not those', other)),
    (('--config.num_steps=6',), ('was trained with distill.teacher', teacher_dir)),
    ((f'--config.distill.teacher={five}', '--config.num_steps=6'), ('5 classes', 'has 4')),
  ]:
    one_error_line(_train(workdir, data_dir, *extra), *needles)
  assert sorted(os.listdir(workdir / 'checkpoints')) == steps
  assert json.loads((workdir / 'teacher.json').read_text()) == record
