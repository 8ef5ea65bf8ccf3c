"""The compiled evaluator against a loop-by-loop NumPy re-implementation of semseg's test
protocol, whole vs slide, bounded compilations, and dataset metrics."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli import cli_env
from flax import nnx
from PIL import Image
from tiny_models import TINY, random_model, tiny_model

from pspnet_jax import checkpoint, ops
from pspnet_jax.evaluation import EvalConfig, Evaluator, evaluate, metrics, outputs
from pspnet_jax.normalize import MEAN, STD
from pspnet_jax.palette import default_palette

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=1)


def _image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- NumPy reference: semseg tool/test.py written as plain loops -----------------------


def np_resize(a, out_h, out_w):
  """cv2.resize INTER_LINEAR: half-pixel centres, clamped, no antialiasing; float64."""

  def axis_taps(n_in, n_out):
    out = []
    for j in range(n_out):
      src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = min(int(math.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      f = src - i0 if i0 < n_in - 1 else 0.0
      out.append((i0, i1, f))
    return out

  a = np.asarray(a, np.float64)
  rows = np.stack([(1 - f) * a[i0] + f * a[i1] for i0, i1, f in axis_taps(a.shape[0], out_h)])
  return np.stack(
    [(1 - f) * rows[:, i0] + f * rows[:, i1] for i0, i1, f in axis_taps(a.shape[1], out_w)], axis=1
  )


def np_protocol(
  forward,
  image,
  num_classes,
  scales,
  crop,
  base_size,
  stride_rate=2 / 3,
  flip=True,
  mean=MEAN,
  std=STD,
):
  h, w, _ = image.shape
  image = image.astype(np.float64)
  prediction = np.zeros((h, w, num_classes))
  for scale in scales:
    long_size = round(scale * base_size)
    new_h, new_w = long_size, long_size
    if h > w:
      new_w = round(long_size / float(h) * w)
    else:
      new_h = round(long_size / float(w) * h)
    img = np_resize(image, new_h, new_w)
    pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
    ph0, pw0 = pad_h // 2, pad_w // 2
    padded = np.empty((new_h + pad_h, new_w + pad_w, 3))
    padded[:] = mean
    padded[ph0 : ph0 + new_h, pw0 : pw0 + new_w] = img
    H, W = padded.shape[:2]
    stride = int(np.ceil(crop * stride_rate))
    acc = np.zeros((H, W, num_classes))
    cnt = np.zeros((H, W))
    for ih in range(int(np.ceil((H - crop) / stride) + 1)):
      for iw in range(int(np.ceil((W - crop) / stride) + 1)):
        e_h = min(ih * stride + crop, H)
        e_w = min(iw * stride + crop, W)
        s_h, s_w = e_h - crop, e_w - crop
        win = (padded[s_h:e_h, s_w:e_w] - mean) / std
        batch = np.stack([win, win[:, ::-1]]) if flip else win[None]
        logits = np.asarray(forward(batch.astype(np.float32)), np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p = (p[0] + p[1][:, ::-1]) / 2 if flip else p[0]
        acc[s_h:e_h, s_w:e_w] += p
        cnt[s_h:e_h, s_w:e_w] += 1
    acc /= cnt[..., None]
    prediction += np_resize(acc[ph0 : ph0 + new_h, pw0 : pw0 + new_w], h, w)
  return prediction / len(scales)


def jitted_forward(model):
  model = nnx.merge(*nnx.split(model))
  model.eval()
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda x: fn(state, x)


# ---- tests ------------------------------------------------------------------------------


def test_multiscale_flip_slide_matches_numpy_protocol(model):
  # One bucket (96 x 96) holds all three sizes: bucket padding must not change anything.
  # At base 64 and crop 33 the scales give 1x1 up to 3x4 windows, odd padding included.
  cfg = EvalConfig(
    mode='slide',
    scales=(0.5, 1.0, 1.75),
    flip=True,
    crop_size=33,
    base_size=64,
    window_batch=2,
    bucket_multiple=96,
  )
  ev = Evaluator(model, cfg)
  forward = jitted_forward(model)
  for size in [(41, 67), (70, 45), (64, 64)]:
    image = _image(np.random.default_rng(sum(size)), *size)
    got = ev.probabilities(image)
    want = np_protocol(forward, image, TINY.num_classes, cfg.scales, 33, 64)
    assert got.shape == size + (TINY.num_classes,)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - 1 / TINY.num_classes).max() > 0.05  # not a flat, uninformative output
  assert ev.compilations == 1


def test_the_models_own_mean_and_std_normalise_and_pad(model):
  """A model whose config carries another normalisation (a Caffe port's, say) is evaluated
  with it: the windows, and the padding (the mean, i.e. zero once normalised)."""
  import dataclasses

  config = dataclasses.replace(model.config, mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
  other = nnx.merge(nnx.split(checkpoint.abstract_model(config))[0], nnx.state(model))
  cfg = EvalConfig(mode='slide', crop_size=33, base_size=40, window_batch=2)
  image = _image(np.random.default_rng(5), 25, 40)  # padded to 33 rows
  got = Evaluator(other, cfg).probabilities(image)
  want = np_protocol(
    jitted_forward(other),
    image,
    TINY.num_classes,
    (1.0,),
    33,
    40,
    mean=np.float32(config.mean),
    std=np.float32(config.std),
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  default = np_protocol(jitted_forward(other), image, TINY.num_classes, (1.0,), 33, 40)
  assert np.abs(default - want).max() > 1e-2  # the normalisation matters to this model


def test_slide_with_one_covering_window_equals_whole(model):
  rng = np.random.default_rng(3)
  image = _image(rng, 48, 64)
  whole = Evaluator(model, EvalConfig(mode='whole', base_size=64, whole_multiple=64)).probabilities(
    image
  )
  # The same through a (one-device) mesh: window batches carry a sharding constraint.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  slide = Evaluator(
    model, EvalConfig(mode='slide', base_size=64, crop_size=64), mesh=mesh
  ).probabilities(image)
  np.testing.assert_allclose(slide, whole, atol=1e-6)


def test_predict_in_bands_equals_the_argmax_of_the_probabilities():
  """predict (and the dataset's predictions) take the argmax one band of output rows at a
  time, never holding [H, W, classes] probabilities: exactly the labels of the plain
  argmax, on 60 classes, several scales with flip, and a bucket of several bands."""
  import dataclasses

  many = random_model(dataclasses.replace(TINY, num_classes=60), seed=4)
  cfg = EvalConfig(
    mode='slide', scales=(0.75, 1.25), flip=True, crop_size=33, base_size=48, bucket_multiple=32
  )
  ev = Evaluator(many, cfg)
  rng = np.random.default_rng(5)
  for size in [(70, 45), (96, 31)]:  # buckets of 3 bands of 32 rows
    image = _image(rng, *size)
    plain = np.argmax(ev.probabilities(image), axis=-1)
    assert len(np.unique(plain)) >= 4  # several classes compete across the bands
    np.testing.assert_array_equal(ev.predict(image), plain)
    seen = {}
    ev.evaluate_dataset(
      [{'image': image, 'label': np.zeros(size, np.uint8)}],
      on_prediction=lambda i, p, seen=seen: seen.__setitem__(i, p),
    )
    np.testing.assert_array_equal(seen[0], plain)


def test_compilations_bounded_by_buckets(model):
  cfg = EvalConfig(mode='slide', scales=(0.75, 1.0), crop_size=33, base_size=48, bucket_multiple=32)
  ev = Evaluator(model, cfg)
  sizes = [(20, 30), (25, 31), (30, 17), (40, 50), (45, 60), (33, 64), (64, 33)]
  rng = np.random.default_rng(0)
  examples = [
    {
      'image': _image(rng, *sizes[i % 7]),
      'label': rng.integers(0, 5, sizes[i % 7]).astype(np.uint8),
    }
    for i in range(20)
  ]
  buckets = {ev.bucket(*s) for s in sizes}
  assert len(buckets) < len(sizes)  # several sizes share a bucket
  confusion, n, _ = ev.evaluate_dataset(examples)
  assert n == 20 and ev.compilations == len(buckets)
  ev.evaluate_dataset(examples[:7])
  assert ev.compilations == len(buckets)  # nothing new for sizes seen before
  assert confusion.sum() == sum(e['label'].size for e in examples)


def test_dataset_metrics_match_per_image_predictions(model):
  cfg = EvalConfig(mode='slide', scales=(1.0,), crop_size=33, base_size=48, bucket_multiple=64)
  ev = Evaluator(model, cfg)
  rng = np.random.default_rng(5)
  examples = []
  for size in [(30, 40), (48, 20)]:  # one 64 x 64 bucket
    label = rng.integers(0, 5, size).astype(np.uint8)
    label[:3] = 255
    examples.append({'image': _image(rng, *size), 'label': label})
  preds = {}
  confusion, _, _ = ev.evaluate_dataset(examples, on_prediction=preds.__setitem__)
  want = np.zeros_like(confusion)
  for i, ex in enumerate(examples):
    np.testing.assert_array_equal(preds[i], ev.predict(ex['image']))
    want += metrics.confusion_to_numpy(metrics.confusion_matrix(preds[i], ex['label'], 5))
  np.testing.assert_array_equal(confusion, want)
  m = evaluate(model, examples, 5, cfg, class_names=list('abcde'))
  assert m['miou'] == metrics.segmentation_metrics(want)['miou'] and m['images'] == 2
  assert [c['name'] for c in m['per_class']] == list('abcde')


def test_bad_inputs_are_named(model):
  ev = Evaluator(model, EvalConfig(crop_size=33, base_size=48))
  with pytest.raises(ValueError, match='example 0: label values'):
    ev.evaluate_dataset(
      [{'image': np.zeros((8, 8, 3), np.uint8), 'label': np.full((8, 8), 7, np.uint8)}]
    )
  with pytest.raises(ValueError, match='mode'):
    EvalConfig(mode='sliding')


# ---- outputs and the predict CLI ---------------------------------------------------------


def test_write_eval_outputs(tmp_path, capsys):
  conf = np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]])
  m = metrics.segmentation_metrics(conf, ['sky', 'road', 'boat'])
  m.update(images=2, seconds=4.0, images_per_second=0.5)
  paths = outputs.write_eval_outputs(str(tmp_path), m, eval_config=EvalConfig())
  saved = json.loads(open(paths['metrics']).read())
  assert {'miou', 'macc', 'allacc', 'fwiou', 'per_class', 'images_per_second', 'seconds'} <= set(
    saved
  )
  assert saved['per_class'][2] == {
    'name': 'boat',
    'iou': None,
    'precision': None,
    'recall': None,
    'f1': None,
  }
  assert saved['eval_config']['stride_rate'] == pytest.approx(2 / 3)
  out = capsys.readouterr().out
  assert 'road' in out and 'mIoU' in out and open(paths['table']).read().strip() == out.strip()
  chart = Image.open(paths['chart'])
  assert chart.size[1] > 3 * 14


def test_predict_cli_writes_promised_files(tmp_path, model):
  palette = [[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200], [250, 250, 0]]
  checkpoint.save_model(tmp_path / 'model', model, metadata={'palette': palette})
  rng = np.random.default_rng(0)
  images = {'a': _image(rng, 30, 40), 'b': _image(rng, 44, 26)}
  (tmp_path / 'in').mkdir()
  for stem, img in images.items():
    Image.fromarray(img).save(tmp_path / 'in' / f'{stem}.png')
  (tmp_path / 'in' / 'notes.txt').write_text('not an image')
  cmd = [
    sys.executable,
    '-m',
    'pspnet_jax.predict',
    str(tmp_path / 'in'),
    '--checkpoint',
    str(tmp_path / 'model'),
    '--out',
    str(tmp_path / 'out'),
    '--mode',
    'slide',
    '--scales',
    '0.75,1.0',
    '--base-size',
    '32',
    '--crop-size',
    '17',
  ]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=cli_env(), cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  ev = Evaluator(model, EvalConfig(scales=(0.75, 1.0), base_size=32, crop_size=17))
  for stem, img in images.items():
    ids = np.asarray(Image.open(tmp_path / 'out' / f'{stem}.png'))
    assert ids.dtype == np.uint8 and ids.shape == img.shape[:2]
    np.testing.assert_array_equal(ids, ev.predict(img))
    color = np.asarray(Image.open(tmp_path / 'out' / f'{stem}_color.png'))
    np.testing.assert_array_equal(color, np.asarray(palette, np.uint8)[ids])
    assert Image.open(tmp_path / 'out' / f'{stem}_overlay.jpg').size == img.shape[1::-1]
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(
    f'{s}{suffix}' for s in images for suffix in ('.png', '_color.png', '_overlay.jpg')
  )


def test_predict_never_overwrites_inputs_or_its_own_outputs(tmp_path, model):
  """--out = the input folder is refused before any work (the inputs unchanged); a.jpg and
  a.png get distinct outputs; a 16-bit PNG predicts as the same image saved in 8 bits."""
  checkpoint.save_model(tmp_path / 'model', model)
  rng = np.random.default_rng(7)
  src = tmp_path / 'in'
  src.mkdir()
  Image.fromarray(_image(rng, 30, 40)).save(src / 'a.png')
  Image.fromarray(_image(rng, 30, 40)).save(src / 'a.jpg', quality=95)
  gray = rng.integers(0, 256, (28, 36), dtype=np.uint8)
  Image.fromarray(gray).save(src / 'g8.png')
  Image.fromarray(gray.astype(np.uint16) * 257).save(src / 'g16.png')  # mode I;16, 0..65535
  before = {f: (src / f).read_bytes() for f in os.listdir(src)}
  cmd = lambda out: [
    sys.executable,
    '-m',
    'pspnet_jax.predict',
    str(src),
    '--checkpoint',
    str(tmp_path / 'model'),
    '--out',
    str(out),
    '--mode',
    'whole',
    '--base-size',
    '32',
  ]
  run = subprocess.run(
    cmd(src), capture_output=True, text=True, timeout=240, env=cli_env(), cwd=ROOT
  )
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  line = run.stderr.strip().splitlines()[-1]
  assert line.startswith('error: --out ') and 'would replace the input' in line, line
  assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before  # nothing touched
  run = subprocess.run(
    cmd(tmp_path / 'out'), capture_output=True, text=True, timeout=240, env=cli_env(), cwd=ROOT
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'keep the extension' in run.stderr
  written = sorted(os.listdir(tmp_path / 'out'))
  assert {'a.jpg.png', 'a.png.png', 'g8.png', 'g16.png'} <= set(written) and 'a.png' not in written
  ev = Evaluator(model, EvalConfig(mode='whole', base_size=32))
  for name, image in [
    ('a.png.png', np.asarray(Image.open(src / 'a.png'))),
    ('a.jpg.png', np.asarray(Image.open(src / 'a.jpg').convert('RGB'))),
  ]:
    np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / 'out' / name)), ev.predict(image)
    )
  g8 = np.asarray(Image.open(tmp_path / 'out' / 'g8.png'))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'g16.png')), g8)
  np.testing.assert_array_equal(g8, ev.predict(np.repeat(gray[..., None], 3, -1)))


def test_label_png_id_mapping(tmp_path):
  pred = np.array([[0, 1], [2, 1]])
  pal = default_palette(3)
  outputs.write_prediction(str(tmp_path), 'x', pred, palette=pal, id_map=[7, 8, 11])
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'x.png')), [[7, 8], [11, 8]])
  assert pal[1].tolist() == [128, 0, 0]  # Pascal VOC colours by default
  with pytest.raises(ValueError, match='id_map'):
    outputs.map_ids(np.array([[3]]), [7, 8, 11])


def test_resize_taps_match_opencv():
  import cv2

  rng = np.random.default_rng(0)
  for (h, w), (nh, nw) in [((512, 683), (384, 512)), ((512, 683), (672, 896)), ((37, 5), (5, 37))]:
    a = (rng.random((h, w, 3)) * 255).astype(np.float32)
    r0, r1, rw0, rw1 = ops.linear_taps(h, nh, convention='opencv')
    c0, c1, cw0, cw1 = ops.linear_taps(w, nw, convention='opencv')
    rows = a[r0] * rw0[:, None, None] + a[r1] * rw1[:, None, None]
    got = rows[:, c0] * cw0[None, :, None] + rows[:, c1] * cw1[None, :, None]
    np.testing.assert_allclose(
      got, cv2.resize(a, (nw, nh), interpolation=cv2.INTER_LINEAR), atol=1e-4
    )


# ---- scales, shares, devices -------------------------------------------------------------


def test_per_scale_metrics_equal_each_scale_run_alone(model):
  """per_scale=True scores the combination and each scale in one pass; each equals a run
  with that scale alone, the combination a run without per_scale."""
  rng = np.random.default_rng(7)
  examples = [
    {'image': _image(rng, *s), 'label': rng.integers(0, 5, s).astype(np.uint8)}
    for s in [(30, 40), (41, 27), (33, 33)]
  ]
  base = dict(mode='slide', crop_size=33, base_size=40, bucket_multiple=32)
  both = evaluate(model, examples, 5, EvalConfig(scales=(0.75, 1.25), per_scale=True, **base))
  assert set(both['per_scale']) == {'0.75', '1.25'}
  plain = evaluate(model, examples, 5, EvalConfig(scales=(0.75, 1.25), **base))
  assert both['per_class'] == plain['per_class'] and 'per_scale' not in plain
  for scale in (0.75, 1.25):
    alone = evaluate(model, examples, 5, EvalConfig(scales=(scale,), **base))
    assert both['per_scale'][f'{scale:g}']['per_class'] == alone['per_class'], scale
  assert both['processes'] == 1 and both['per_process_images'] == [3]


def test_process_shares_cover_everything_once_and_balance_cost():
  from pspnet_jax.evaluation import image_cost, process_shares

  cfg = EvalConfig(mode='slide', crop_size=473, base_size=512, scales=(1.0,))
  sizes = [(512, 683), (375, 500), (1024, 2048), (512, 512)] * 5 + [(2048, 1024)]
  costs = [image_cost(h, w, cfg) for h, w in sizes]
  # the long side is fixed by the protocol: a square image needs 2x2 windows, a 3:4 one 1x2
  assert costs[3] == 2 * costs[0] == 2 * costs[2]
  for n in (1, 2, 3, 4):
    shares = process_shares(costs, n)
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)  # greedy bound: within one image
    assert all(s == sorted(s) for s in shares)
  assert process_shares(costs, 2) == process_shares(list(costs), 2)  # deterministic


def test_evaluator_and_predict_on_four_devices_equal_one_device(tmp_path, model):
  """A loaded model (committed to one device) evaluates on a 4-device mesh: the weights are
  replicated there; a dataset runs one image a device and ``predict`` spreads one image's
  windows over the devices; metrics and labels equal one device's."""
  checkpoint.save_model(tmp_path / 'model', model)
  rng = np.random.default_rng(3)
  data = {'images': [], 'labels': []}
  for s in [(30, 40), (41, 27), (20, 50)]:
    data['images'].append(_image(rng, *s))
    data['labels'].append(rng.integers(0, 5, s).astype(np.uint8))
  np.savez(tmp_path / 'data.npz', *data['images'], *data['labels'])
  code = """
import json, sys, numpy as np, jax
from pspnet_jax import checkpoint, hlo
from pspnet_jax.evaluation import EvalConfig, Evaluator, evaluate
model = checkpoint.load_model(sys.argv[1])
arrays = np.load(sys.argv[2]); n = len(arrays.files) // 2
examples = [{'image': arrays[f'arr_{i}'], 'label': arrays[f'arr_{i + n}']} for i in range(n)]
out = {'devices': jax.device_count()}
for mode in ('slide', 'whole'):
  cfg = EvalConfig(mode=mode, scales=(0.75, 1.0), crop_size=17, base_size=32, bucket_multiple=32)
  m = evaluate(model, examples, 5, cfg)
  ev = Evaluator(model, cfg)
  seen = {}
  ev.evaluate_dataset(examples, on_prediction=lambda i, p: seen.__setitem__(i, p.tolist()))
  # What crosses between devices when each scores whole images: confusion counts only.
  text = ev.lower(30, 40, one_image_per_device=True)[0].compile().as_text()
  out[mode] = {'per_class': m['per_class'], 'miou': m['miou'], 'batch': ev.window_batch,
               'labels': [ev.predict(e['image']).tolist() for e in examples],
               'dataset_labels': [seen[i] for i in range(n)],
               'collectives': [(c['op'], c['dtype'], c['elements']) for c in hlo.collectives(text, 4)]}
print(json.dumps(out))
"""
  results = {}
  for devices in (1, 4):
    run = subprocess.run(
      [sys.executable, '-c', code, str(tmp_path / 'model'), str(tmp_path / 'data.npz')],
      capture_output=True,
      text=True,
      timeout=300,
      env=cli_env(devices),
      cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results[devices] = json.loads(run.stdout.strip().splitlines()[-1])
  assert results[4]['devices'] == 4 and results[4]['slide']['batch'] == 4
  for mode in ('slide', 'whole'):
    assert results[4][mode]['labels'] == results[1][mode]['labels'], mode
    assert results[4][mode]['per_class'] == results[1][mode]['per_class'], mode
    # evaluate_dataset's predictions (one image a device on 4) are predict's, in order.
    assert results[4][mode]['dataset_labels'] == results[1][mode]['labels'], mode
    colls = results[4][mode]['collectives']
    assert colls and all(
      op == 'all-reduce' and dtype == 's32' and n <= 5 * 5 for op, dtype, n in colls
    ), colls


def test_predict_skips_an_unreadable_file_and_says_which(tmp_path, model):
  checkpoint.save_model(tmp_path / 'model', model)
  (tmp_path / 'in').mkdir()
  Image.fromarray(_image(np.random.default_rng(0), 20, 30)).save(tmp_path / 'in' / 'good.png')
  (tmp_path / 'in' / 'broken.png').write_bytes(b'not a png at all')
  cmd = [
    sys.executable,
    '-m',
    'pspnet_jax.predict',
    str(tmp_path / 'in'),
    '--checkpoint',
    str(tmp_path / 'model'),
    '--out',
    str(tmp_path / 'out'),
    '--mode',
    'whole',
    '--base-size',
    '32',
  ]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=cli_env(), cwd=ROOT)
  assert run.returncode == 2, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  assert 'broken.png' in run.stderr and '1 of 2 files' in run.stderr
  assert sorted(os.listdir(tmp_path / 'out')) == ['good.png', 'good_color.png', 'good_overlay.jpg']
  run = subprocess.run(
    cmd[:5] + [str(tmp_path / 'nowhere')] + cmd[6:],
    capture_output=True,
    text=True,
    timeout=240,
    env=cli_env(),
    cwd=ROOT,
  )
  assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith('error: ')
