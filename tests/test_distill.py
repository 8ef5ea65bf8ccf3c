"""The distillation losses against NumPy formulas written here: channel-wise distillation
(Shu et al. ICCV 2021, as mmrazor's ChannelWiseDivergence computes it: N*C spatial
distributions) and the pixel-wise KL over labelled positions; tau != 1, ignored positions,
and gradients (the teacher gets none; the student's equals a finite difference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspnet_jax.train.distill import channel_wise_divergence, pixel_kl


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
