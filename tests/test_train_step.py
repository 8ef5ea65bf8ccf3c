"""The train step and the optimiser: multi-device equivalence (synchronised BN), the poly
schedule, per-group learning rates and PyTorch SGD semantics."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from pspnet_jax import train_lib
from pspnet_jax.optimizer import OptimizerConfig, make_optimizer, param_groups, poly_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_step(tmp_path, devices):
  out = tmp_path / f'step_{devices}.npz'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'scripts', 'one_train_step.py'), str(out)],
                 env=env, check=True, timeout=300)
  return dict(np.load(out))


def test_four_devices_equal_one_device(tmp_path):
  """Same global batch on 1 and 4 (simulated) devices: same parameters and BN statistics
  after two steps, i.e. BN uses the global batch's statistics (synchronised BN)."""
  one, four = _run_step(tmp_path, 1), _run_step(tmp_path, 4)
  assert int(one['__devices']) == 1 and int(four['__devices']) == 4
  keys = [k for k in one if not k.startswith('__')]
  assert any(k.endswith('running_var') for k in keys)
  for k in keys:
    np.testing.assert_allclose(four[k], one[k], atol=1e-5, rtol=0, err_msg=k)


def test_poly_schedule_formula():
  base, total = 0.01, 1000
  lr = poly_schedule(base, total, 0.9)
  for k in (0, 1, 250, 999, 1000):
    # float32 schedule: ~1e-5 relative near the end (an off-by-one step would be 2x there)
    assert float(lr(k)) == pytest.approx(base * (1 - k / total) ** 0.9, rel=1e-4, abs=1e-12)
  warm = poly_schedule(base, total, 0.9, warmup_steps=100)
  assert float(warm(0)) == 0.0
  assert float(warm(100)) == pytest.approx(base * (1 - 100 / total) ** 0.9, rel=1e-5)
  assert float(warm(50)) == pytest.approx(0.5 * base * (1 - 100 / total) ** 0.9, rel=1e-5)


def test_head_layers_get_ten_times_the_backbone_learning_rate():
  params = {'backbone': {'layer1': jnp.ones(3)}, 'ppm': {'w': jnp.ones(2)},
            'cls': {'w': jnp.ones(2)}, 'aux': {'w': jnp.ones(2)}}
  assert param_groups(params) == {'backbone': {'layer1': 'backbone'}, 'ppm': {'w': 'head'},
                                  'cls': {'w': 'head'}, 'aux': {'w': 'head'}}
  total = 100
  tx = make_optimizer(OptimizerConfig(learning_rate=0.01, momentum=0.0, weight_decay=0.0), total)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for k in range(3):
    updates, state = tx.update(grads, state, params)
    lr = 0.01 * (1 - k / total) ** 0.9
    np.testing.assert_allclose(updates['backbone']['layer1'], -lr, rtol=1e-6)
    for head in ('ppm', 'cls', 'aux'):
      np.testing.assert_allclose(updates[head]['w'], -10 * lr, rtol=1e-6)


def test_sgd_matches_torch_coupled_weight_decay_and_momentum():
  """optax chain == torch.optim.SGD(momentum=0.9, weight_decay=1e-4) with semseg's per-
  iteration poly learning rate, over several steps."""
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal(6).astype(np.float32)
  grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
  total = 10
  tx = make_optimizer(OptimizerConfig(learning_rate=0.1), total)
  params = {'backbone': jnp.asarray(p0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'backbone': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
  opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=1e-4)
  for k, g in enumerate(grads):
    for group in opt.param_groups:
      group['lr'] = 0.1 * (1 - k / total) ** 0.9
    tp.grad = torch.from_numpy(g)
    opt.step()
  np.testing.assert_allclose(np.asarray(params['backbone']), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_ignores_255_like_torch():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 6))
  labels[0, :2] = 255
  got = float(train_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  want = torch.nn.functional.cross_entropy(torch.from_numpy(logits.transpose(0, 3, 1, 2)),
                                           torch.from_numpy(labels), ignore_index=255).item()
  assert got == pytest.approx(want, rel=1e-6)


def test_batch_size_must_divide_devices():
  code = ('from pspnet_jax import train_lib\n'
          'try:\n  train_lib.check_batch_size(6)\nexcept ValueError as e:\n  print(e)\n'
          'train_lib.check_batch_size(8)\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert 'global_batch_size=6 does not divide over 4 devices' in out
  with pytest.raises(ValueError, match='micro-batches'):
    train_lib.check_batch_size(3, grad_accum_steps=2)


@pytest.mark.parametrize('strategy', ['xla', 'taps', 'shifted'])
@pytest.mark.parametrize('k,ci,co,stride,dilation,size', [
    (1, 32, 16, 1, 1, 9), (1, 16, 32, 2, 1, 11), (3, 8, 12, 1, 2, 13), (3, 8, 8, 1, 4, 17),
    (3, 6, 10, 2, 1, 10), (3, 20, 6, 1, 1, 8), (7, 3, 8, 2, 1, 15)])
def test_cpu_conv_equals_xla_convolution(k, ci, co, stride, dilation, size, strategy, monkeypatch):
  """`cpu_conv` (1x1 as matmul, wide inputs split, each weight-gradient strategy) has XLA's
  convolution's output and both gradients, on odd sizes, strides and dilations."""
  from jax import lax
  from pspnet_jax import ops
  from pspnet_jax.models import layers
  monkeypatch.setenv('PSPNET_CONV_WGRAD', strategy)
  monkeypatch.setattr(layers, 'CIN_CHUNK', 8)  # ci=20 splits into 8 + 8 + 4
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size + 3, ci)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, ci, co)), jnp.float32)
  pad = ops.conv_padding(k, dilation)
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, rhs_dilation=(dilation, dilation),
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  mine = lambda x, w: layers.cpu_conv(x, w, (stride, stride), pad, (dilation, dilation))
  y, r = np.asarray(jax.jit(mine)(x, w)), np.asarray(ref(x, w))
  assert y.shape == r.shape
  np.testing.assert_allclose(y, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  gx, gw = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * float(jnp.abs(rw).max()))


def test_models_use_cpu_conv_on_cpu_only_unless_disabled(monkeypatch):
  """The CPU rewrites are what the benchmarks measure: every conv of a model built on CPU
  goes through `cpu_conv`; PSPNET_CONV=xla builds XLA's plain convolutions."""
  from pspnet_jax.models import layers
  rngs = nnx.Rngs(0)
  assert jax.default_backend() == 'cpu'
  conv = layers.conv2d(8, 8, 3, rngs=rngs)
  assert conv.conv_general_dilated is layers._cpu_conv_general_dilated
  monkeypatch.setenv('PSPNET_CONV', 'xla')
  assert layers.conv2d(8, 8, 3, rngs=rngs).conv_general_dilated is not layers._cpu_conv_general_dilated
