"""Metrics against plain NumPy loops: confusion counting, ignore pixels, absent classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspnet_jax.evaluation import metrics


def numpy_confusion(pred, label, c, ignore=255):
  conf = np.zeros((c, c), np.int64)
  for p, t in zip(pred.ravel(), label.ravel()):
    if t != ignore:
      conf[t, p] += 1
  return conf


def numpy_scores(conf, absent='exclude'):
  """Per-class loops written from the definitions, independent of metrics.py."""
  c = conf.shape[0]
  ious, accs, fw = [], [], 0.0
  total = conf.sum()
  for k in range(c):
    tp = conf[k, k]
    gt = conf[k, :].sum()
    pr = conf[:, k].sum()
    union = gt + pr - tp
    if union > 0:
      ious.append(tp / union)
      fw += gt / total * tp / union
    elif absent == 'zero':
      ious.append(0.0)
    if gt > 0:
      accs.append(tp / gt)
    elif absent == 'zero':
      accs.append(0.0)
  return np.mean(ious), np.mean(accs), np.trace(conf) / total, fw


def test_confusion_matches_numpy_with_ignore_pixels():
  rng = np.random.default_rng(0)
  c = 6
  pred = rng.integers(0, c, (37, 53))
  label = rng.integers(0, c, (37, 53))
  label[rng.random(label.shape) < 0.2] = 255
  got = jax.jit(metrics.confusion_matrix, static_argnums=2)(
    jnp.asarray(pred), jnp.asarray(label), c
  )
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), numpy_confusion(pred, label, c))


def test_accumulator_carries_past_32_bits():
  acc = metrics.empty_confusion(2)
  big = jnp.full((2, 2), 2**31 - 1, jnp.int32)
  for _ in range(5):
    acc = metrics.add_confusion(acc, big)
  np.testing.assert_array_equal(metrics.confusion_to_numpy(acc), np.full((2, 2), 5 * (2**31 - 1)))


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('absent', ['exclude', 'zero'])
def test_scores_match_numpy_on_random_confusions(seed, absent):
  rng = np.random.default_rng(seed)
  c = 7
  conf = rng.integers(0, 1000, (c, c))
  # Class 2 absent from truth and prediction; class 4 predicted but never true; class 5
  # true but never predicted.
  conf[2, :] = conf[:, 2] = 0
  conf[4, :] = 0
  conf[:, 5] = 0
  names = [f'n{i}' for i in range(c)]
  m = metrics.segmentation_metrics(conf, names, absent=absent)
  miou, macc, allacc, fwiou = numpy_scores(conf, absent)
  np.testing.assert_allclose(
    [m['miou'], m['macc'], m['allacc'], m['fwiou']], [miou, macc, allacc, fwiou], rtol=1e-12
  )
  pc = m['per_class']
  assert [p['name'] for p in pc] == names
  assert pc[2] == {'name': 'n2', 'iou': None, 'precision': None, 'recall': None, 'f1': None}
  assert pc[4]['iou'] == 0.0 and pc[4]['recall'] is None and pc[4]['precision'] == 0.0
  assert pc[5]['precision'] is None and pc[5]['recall'] == 0.0
  k = 1
  tp, gt, pr = conf[k, k], conf[k].sum(), conf[:, k].sum()
  np.testing.assert_allclose(
    [pc[k]['precision'], pc[k]['recall'], pc[k]['f1']],
    [tp / pr, tp / gt, 2 * (tp / pr) * (tp / gt) / (tp / pr + tp / gt)],
  )


def test_semseg_rule_counts_absent_classes_as_zero():
  conf = np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
  excl = metrics.segmentation_metrics(conf)['miou']
  zero = metrics.segmentation_metrics(conf, absent='zero')['miou']
  # semseg: intersection / (union + 1e-10), np.mean over every class.
  tp, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
  np.testing.assert_allclose(zero, np.mean(tp / (union + 1e-10)), rtol=1e-9)
  np.testing.assert_allclose(excl, zero * 3 / 2)


def test_label_maps_end_to_end_and_accumulated_over_images():
  rng = np.random.default_rng(1)
  c = 5
  acc = metrics.empty_confusion(c)
  total = np.zeros((c, c), np.int64)
  for shape in [(8, 9), (13, 4), (6, 6)]:
    pred = rng.integers(0, c - 1, shape)  # class c-1 never predicted
    label = rng.integers(0, c - 1, shape)  # ... nor true: excluded from the means
    label[0] = 255
    acc = metrics.add_confusion(
      acc, metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), c)
    )
    total += numpy_confusion(pred, label, c)
  np.testing.assert_array_equal(metrics.confusion_to_numpy(acc), total)
  m = metrics.segmentation_metrics(acc)
  np.testing.assert_allclose(m['miou'], numpy_scores(total)[0])
  assert m['per_class'][c - 1]['iou'] is None


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='class names'):
    metrics.segmentation_metrics(np.eye(3, dtype=int), ['a'])
  with pytest.raises(ValueError, match='absent'):
    metrics.segmentation_metrics(np.eye(3, dtype=int), absent='nan')
  with pytest.raises(ValueError, match='shape'):
    metrics.confusion_matrix(jnp.zeros((2, 3), int), jnp.zeros((3, 2), int), 3)


def test_confusion_counts_sum_exactly_past_2_32_across_processes(tmp_path):
  """Two processes on loopback: mesh.sum_over_processes (the evaluator's cross-process sum
  of its confusion matrices) adds counts of 3 x 2**31 and 6 x 2**31 per cell to the exact
  int64 9 x 2**31 (> 2**32; an int32 or uint32 sum, or JAX's default int32 without x64,
  would wrap), the same on both processes."""
  import sys

  from cli import ROOT, cli_env, free_port, run_together

  port, script = free_port(), f'{ROOT}/tests/scripts/sum_counts.py'
  runs = run_together(
    [
      [sys.executable, script, str(port), str(i), '2', str(tmp_path / f'{i}.npy')] for i in range(2)
    ],
    env=cli_env(1),
    timeout=180,
  )
  assert all(code == 0 for code, _ in runs), runs
  want = 9 * 2**31 + 2 * np.arange(16, dtype=np.int64).reshape(4, 4)
  assert want.min() > 2**32
  for i in range(2):
    got = np.load(tmp_path / f'{i}.npy')
    assert got.dtype == np.int64 and np.array_equal(got, want), got
