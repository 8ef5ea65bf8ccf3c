"""pspnet_jax.ops against PyTorch: adaptive average pooling, bilinear resizing, pyramid pooling,
the stem max pool (both roundings) and Caffe's fixed-window average pool. (Against Caffe's
own layer code: tests/caffe_reference.py, in tests/test_port_caffe.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pspnet_jax import ops

pytestmark = pytest.mark.parity

BINS = (1, 2, 3, 6)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


def test_pool_coefficients_match_torch_for_every_size():
  """Bin boundaries for every length 1..70 and every bin count: pooling the identity with
  PyTorch yields its pooling matrix exactly."""
  for n in range(1, 71):
    eye = torch.eye(n, dtype=torch.float64)[None]  # [1, n, n]: n 'channels' of length n
    for b in BINS:
      want = F.adaptive_avg_pool1d(eye, b)[0].T.numpy()  # [b, n]
      np.testing.assert_allclose(ops.adaptive_pool_matrix(n, b), want, rtol=0, atol=1e-15)


def test_adaptive_avg_pool_matches_torch_every_height_and_width():
  """The public function on inputs whose H runs over 1..70 and W over 70..1, all bins.

  Every H value and every W value in 1..70 is exercised with every bin count (each XLA
  compile costs ~0.1 s on CPU, so the 4,900 (H, W) pairs are not each compiled; the op is
  separable by construction and the per-axis coefficients are checked exhaustively above).
  """
  pool_all = jax.jit(lambda x: [ops.adaptive_avg_pool(x, b) for b in BINS])
  rng = np.random.default_rng(0)
  worst = 0.0
  for h in range(1, 71):
    w = 71 - h
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    got = pool_all(x)
    for b, y in zip(BINS, got):
      want = _nhwc(F.adaptive_avg_pool2d(_nchw(x), b))
      assert y.shape == want.shape
      worst = max(worst, float(np.max(np.abs(np.asarray(y) - want))))
  assert worst <= 1e-6, worst


@pytest.mark.parametrize(
  'h,w,b', [(64, 64, 3), (64, 64, 6), (60, 60, 6), (7, 5, 6), (1, 1, 6), (97, 129, 6), (13, 13, 2)]
)
def test_adaptive_avg_pool_overlapping_bins(h, w, b):
  x = np.random.default_rng(1).standard_normal((1, h, w, 4)).astype(np.float32)
  y = np.asarray(ops.adaptive_avg_pool(jnp.asarray(x), b))
  np.testing.assert_allclose(y, _nhwc(F.adaptive_avg_pool2d(_nchw(x), b)), atol=1e-6, rtol=0)


def test_adaptive_avg_pool_is_not_plain_avg_pool():
  """H=64, b=3: bins overlap (0..22, 21..43, 42..64), unlike avg_pool with window 21."""
  x = jnp.arange(64, dtype=jnp.float32).reshape(1, 64, 1, 1)
  y = np.asarray(ops.adaptive_avg_pool(x, (3, 1)))[0, :, 0, 0]
  np.testing.assert_allclose(
    y,
    [np.mean(np.arange(0, 22)), np.mean(np.arange(21, 43)), np.mean(np.arange(42, 64))],
    rtol=1e-6,
  )


RESIZE_CASES = [
  ((1, 1), (7, 9)),
  ((1, 1), (1, 1)),
  ((6, 6), (60, 60)),
  ((60, 60), (473, 473)),
  ((9, 17), (65, 129)),
  ((65, 129), (9, 17)),
  ((97, 129), (31, 45)),
  ((5, 7), (5, 7)),
  ((7, 5), (3, 11)),
  ((13, 13), (1, 1)),
  ((2, 3), (1, 4)),
  ((33, 47), (100, 20)),
]


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('src,dst', RESIZE_CASES)
def test_resize_bilinear_matches_torch(src, dst, align_corners):
  x = np.random.default_rng(2).standard_normal((2, *src, 5)).astype(np.float32)
  y = np.asarray(jax.jit(ops.resize_bilinear, static_argnums=(1, 2))(x, dst, align_corners))
  want = _nhwc(F.interpolate(_nchw(x), dst, mode='bilinear', align_corners=align_corners))
  assert y.shape == want.shape
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)


def test_linear_taps_against_plain_numpy_formula():
  """align_corners=True maps the corners onto each other: out[0]=in[0], out[-1]=in[-1]."""
  x = np.random.default_rng(3).standard_normal((1, 8, 1, 1)).astype(np.float32)
  y = np.asarray(ops.resize_bilinear(jnp.asarray(x), (15, 1), True))
  assert y[0, 0, 0, 0] == x[0, 0, 0, 0] and abs(y[0, -1, 0, 0] - x[0, -1, 0, 0]) < 1e-6
  # Midpoints of an exact 2x upsampling (15 = 2*8-1) are averages of their neighbours.
  np.testing.assert_allclose(y[0, 1::2, 0, 0], (x[0, :-1, 0, 0] + x[0, 1:, 0, 0]) / 2, atol=1e-6)


@pytest.mark.parametrize('align_corners', [True, False])
def test_pyramid_pool_matches_torch_ppm(align_corners):
  """pyramid_pool with a 1x1-conv branch against the semseg PPM computed in PyTorch."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 11, 14, 8)).astype(np.float32)
  weights = [rng.standard_normal((8, 3)).astype(np.float32) for _ in BINS]

  def branch(i, pooled):
    return jax.nn.relu(pooled @ weights[i])

  y = np.asarray(ops.pyramid_pool(jnp.asarray(x), BINS, branch, align_corners=align_corners))
  xt = _nchw(x)
  outs = [xt]
  for b, wgt in zip(BINS, weights):
    p = F.relu(torch.einsum('bchw,cd->bdhw', F.adaptive_avg_pool2d(xt, b), torch.from_numpy(wgt)))
    outs.append(F.interpolate(p, xt.shape[2:], mode='bilinear', align_corners=align_corners))
  want = _nhwc(torch.cat(outs, 1))
  assert y.shape == (2, 11, 14, 8 + 3 * len(BINS))
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('src,dst', [((6, 9), (47, 33)), ((20, 7), (5, 3)), ((1, 4), (3, 1))])
def test_resize_bilinear_gradient_matches_torch(src, dst, align_corners):
  """The custom backward (transposed interpolation matrix) is PyTorch's gradient."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, *src, 3)).astype(np.float32)
  g = rng.standard_normal((2, *dst, 3)).astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(ops.resize_bilinear(x, dst, align_corners) * g))(jnp.asarray(x))
  xt = _nchw(x).requires_grad_(True)
  (F.interpolate(xt, dst, mode='bilinear', align_corners=align_corners) * _nchw(g)).sum().backward()
  np.testing.assert_allclose(np.asarray(got), _nhwc(xt.grad), atol=1e-5, rtol=0)


@pytest.mark.parametrize('h, w', [(9, 9), (10, 7), (1, 2)])
def test_stem_max_pool_matches_torch_values_and_gradient_with_ties(h, w):
  """``MaxPool2d(3, 2, 1)`` on a ReLU'd input, where ties in a window are common: the same
  values, and the gradient goes to one maximum per window as PyTorch's does (a maximum of
  taps differentiated naively would split it between tied taps)."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal((2, h, w, 3)), 0).astype(np.float32)
  x[0, :3, :3, 0] = 0.5  # a window of equal values
  dy = rng.standard_normal((2, (h - 1) // 2 + 1, (w - 1) // 2 + 1, 3)).astype(np.float32)
  xt = _nchw(x).requires_grad_(True)
  yt = F.max_pool2d(xt, 3, 2, 1)
  yt.backward(_nchw(dy))
  y, vjp = jax.vjp(ops.max_pool_3x3_s2, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), _nhwc(yt.detach()))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(dy))[0]), _nhwc(xt.grad))


@pytest.mark.parametrize('h, w', [(10, 8), (9, 12), (2, 1)])
def test_stem_max_pool_ceil_mode_matches_torch(h, w):
  """Rounding up (Caffe's pooling, ``ceil_mode=True``): one more window when H - 1 is odd."""
  rng = np.random.default_rng(1)
  x = np.maximum(rng.standard_normal((2, h, w, 3)), 0).astype(np.float32)
  dy = rng.standard_normal((2, h // 2 + 1, w // 2 + 1, 3)).astype(np.float32)
  xt = _nchw(x).requires_grad_(True)
  yt = F.max_pool2d(xt, 3, 2, 1, ceil_mode=True)
  yt.backward(_nchw(dy))
  y, vjp = jax.vjp(lambda v: ops.max_pool_3x3_s2(v, True), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), _nhwc(yt.detach()))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(dy))[0]), _nhwc(xt.grad))


@pytest.mark.parametrize('h, w, k', [(60, 60, 10), (64, 86, 10), (90, 90, 45), (13, 7, 20)])
def test_avg_pool_ceil_matches_torch(h, w, k):
  """Fixed windows of k, output rounded up, the last window averaged over what it covers."""
  x = np.random.default_rng(2).standard_normal((1, h, w, 4)).astype(np.float32)
  want = _nhwc(F.avg_pool2d(_nchw(x), k, k, ceil_mode=True))
  got = np.asarray(ops.avg_pool_ceil(jnp.asarray(x), k))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('n', [60, 90])
def test_fixed_pyramid_pooling_is_adaptive_pooling_at_its_size(n):
  """At the feature size it was sized for (60 at a 473 crop, 90 at 713) the Caffe pyramid
  pools the same bins as adaptive pooling."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, n, n, 8)).astype(np.float32))
  branch = lambda i, p: p
  fixed = ops.pyramid_pool(x, BINS, branch, fixed_size=n)
  np.testing.assert_allclose(
    np.asarray(fixed), np.asarray(ops.pyramid_pool(x, BINS, branch)), rtol=0, atol=1e-6
  )


def test_symbolic_sizes_give_the_static_taps_and_pooling():
  """Exported with symbolic height and width, the resize and pooling matrices computed in
  the program equal the NumPy ones of each concrete size."""
  from jax import export

  (n,) = export.symbolic_shape('n')

  def matrices(x):  # x: [n] only carries the symbolic size
    size = x.shape[0]
    return (
      ops.interpolation_matrix(size, 11, True),
      ops.interpolation_matrix(size, 11, False),
      ops.interpolation_matrix(6, size, True),
      ops.adaptive_pool_matrix(size, 6),
      ops.ceil_pool_matrix(size, 10),
    )

  program = export.export(jax.jit(matrices), platforms=['cpu'])(
    jax.ShapeDtypeStruct((n,), jnp.float32)
  )
  for size in (1, 5, 60, 97):
    got = program.call(np.zeros(size, np.float32))
    want = (
      ops.interpolation_matrix(size, 11, True),
      ops.interpolation_matrix(size, 11, False),
      ops.interpolation_matrix(6, size, True),
      ops.adaptive_pool_matrix(size, 6),
      ops.ceil_pool_matrix(size, 10),
    )
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-7)
