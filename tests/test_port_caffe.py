"""Porting the authors' Caffe releases (hszhao/PSPNet ``*.caffemodel``) against an
independent Caffe (tests/caffe_reference.py: the fork's layers in NumPy / torch, its
InsertSplits, files written with the protobuf runtime as ``Net::ToProto`` writes them).

Both released depths at both trained sizes, on nets of 1/8 width in the real format:
PSPNet-50 at 473 (ADE20K's deploy net, 150 classes) and PSPNet-101 at 713 (Cityscapes',
19 classes, saved as a training net: data layer, a training-only auxiliary classifier,
losses). Logits within 1e-4 of max|logit|. The full-size PSPNet-101 file (270 MB) is
ported once: every tensor lands where it should, and its layer4 features match the
reference. A port goes through the CLI, predict, eval.py and export (the artifact normalises
with the Caffe mean). Damaged files are refused with one line naming the layer.
"""

import dataclasses
import os
import subprocess
import sys

import caffe_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import cli_env
from flax import nnx

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.port import PortError, load_caffe, port_checkpoint
from pspnet_jax.port.caffe import CAFFE_MEAN, CAFFE_STD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
SMALL = dict(width=8, head=16)


def _env():
  return cli_env()


def _images(n, size, seed):
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@dataclasses.dataclass
class Built:
  deploy: list  # the deploy net's layers (as its prototxt lists them)
  layers: list  # the file's layers (Splits inserted; a training net's extra layers)
  path: str  # the .caffemodel
  prototxt: str


def build(tmp_path, depth, classes, crop, *, training=False, seed=0, **widths) -> Built:
  """A calibrated net of the released layout, written as a .caffemodel (+ its prototxt)."""
  deploy = ref.pspnet_net(depth, classes, crop, seed=seed, **(widths or SMALL))
  ref.forward(deploy, ref.caffe_input(_images(2, crop, seed + 100)), calibrate=True)
  net = ref.as_training_net(deploy, classes) if training else deploy
  inputs = () if training else ('data',)
  layers = ref.insert_splits(net, inputs=inputs)
  name = f'pspnet{depth}_{crop}'
  path = ref.write_caffemodel(tmp_path / f'{name}.caffemodel', layers, inputs=inputs)
  prototxt = ref.write_prototxt(tmp_path / f'{name}.prototxt', deploy, crop)
  return Built(deploy, layers, path, prototxt)


def caffe_logits(layers, rgb):
  """The reference's logits at input size ([B, H, W, C]): the deploy net's conv6_interp, or
  for a training net its conv6 resized as the deploy net's last layer does (zoom 8)."""
  blobs = ref.forward(layers, ref.caffe_input(rgb))
  logits = blobs.get('conv6_interp')
  if logits is None:
    h, w = blobs['conv6'].shape[2:]
    logits = ref.interp(blobs['conv6'], (h - 1) * 8 + 1, (w - 1) * 8 + 1)
  return logits.transpose(0, 2, 3, 1)


@nnx.jit
def forward(model, x):
  return model(x)


def ported_logits(model, rgb):
  config = model.config
  return np.asarray(
    forward(model, jnp.asarray((rgb - np.float32(config.mean)) / np.float32(config.std)))
  )


def parity(got, want):
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  print(f'max|error| {err:.3g} / max|logit| {scale:.3g} = {err / scale:.2g}')
  assert got.shape == want.shape and err <= 1e-4 * scale, (err, scale)
  return err / scale


@pytest.fixture(scope='module')
def ade20k50(tmp_path_factory):
  """PSPNet-50 for ADE20K at 473 (its deploy prototxt's layout), 1/8 width."""
  return build(tmp_path_factory.mktemp('ade'), 50, 150, 473, seed=1)


@pytest.mark.parity
def test_pspnet50_at_473_matches_caffe(ade20k50):
  model, config = load_caffe(ade20k50.path, ade20k50.prototxt)
  assert config == PSPNetConfig(
    num_classes=150,
    depth=50,
    base_width=8,
    head_channels=16,
    stride_in_1x1=True,
    ceil_mode=True,
    pyramid_fixed_size=60,
    mean=CAFFE_MEAN,
    std=CAFFE_STD,
  )
  rgb = _images(1, 473, 2)
  want = caffe_logits(ade20k50.layers, rgb)
  parity(ported_logits(model, rgb), want)
  # A control: the same image in Caffe's BGR order is another input to the ported model.
  assert (
    np.abs(ported_logits(model, rgb[..., ::-1].copy()) - want).max() > 1e-2 * np.abs(want).max()
  )


@pytest.mark.parity
def test_pspnet101_at_713_saved_as_a_training_net_matches_caffe(tmp_path):
  built = build(tmp_path, 101, 19, 713, training=True, seed=3)
  ported = port_checkpoint(built.path)
  assert ported.layout == 'caffe' and ported.recognised_by == 'its .caffemodel name'
  assert ported.config == PSPNetConfig(
    num_classes=19,
    depth=101,
    base_width=8,
    head_channels=16,
    stride_in_1x1=True,
    ceil_mode=True,
    pyramid_fixed_size=90,
    mean=CAFFE_MEAN,
    std=CAFFE_STD,
  )
  assert ported.dropped[
    'training-only layers, off the path to the classifier (not in the deploy net)'
  ] == ['conv_aux', 'label_shrink', 'loss', 'loss_aux']
  assert ported.dropped['data layers (the model takes the image as its input)'] == ['data']
  rgb = _images(1, 713, 4)
  parity(ported_logits(ported.model, rgb), caffe_logits(built.layers, rgb))


def test_the_writer_writes_protobuf_and_splits_as_caffe(ade20k50):
  """The test files are what protobuf parses, with Caffe's Split layers."""
  layers = ade20k50.layers
  net = ref.PROTO['NetParameter'].FromString(open(ade20k50.path, 'rb').read())
  assert [l.name for l in net.layer] == [l['name'] for l in layers]
  splits = {l.name: list(l.top) for l in net.layer if l.type == 'Split'}
  assert splits['conv5_3_conv5_3/relu_0_split'] == [
    f'conv5_3_conv5_3/relu_0_split_{k}' for k in range(5)
  ]
  conv = next(l for l in net.layer if l.name == 'conv5_4')
  np.testing.assert_array_equal(
    np.asarray(conv.blobs[0].data).reshape(tuple(conv.blobs[0].shape.dim)),
    next(l for l in layers if l['name'] == 'conv5_4')['blobs'][0],
  )
  assert list(net.input) == ['data'] and net.name == 'pspnet'


@pytest.mark.parametrize('n, k', [(60, 10), (60, 20), (90, 45), (90, 15), (64, 10), (13, 20)])
def test_pyramid_pooling_and_interp_match_caffe_at_both_trained_sizes(n, k):
  """Layer level, without a net: the fixed AVE pool and the Interp back to the features,
  at 60 (473) and 90 (713), and at sizes the windows do not divide."""
  from pspnet_jax import ops

  x = np.random.default_rng(n + k).standard_normal((1, 4, n, n)).astype(np.float32)
  layer = {'params': {'pooling_param': {'pool': 'AVE', 'kernel_size': k, 'stride': k}}}
  pooled = ref.pooling(layer, x)
  got = np.asarray(ops.avg_pool_ceil(jnp.asarray(x.transpose(0, 2, 3, 1)), k))
  np.testing.assert_allclose(got, pooled.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
  back = ref.interp(pooled, n, n)
  got = np.asarray(ops.resize_bilinear(jnp.asarray(pooled.transpose(0, 2, 3, 1)), (n, n), True))
  np.testing.assert_allclose(got, back.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
  zoomed = ref.interp(x, (n - 1) * 8 + 1, (n - 1) * 8 + 1)
  got = np.asarray(
    ops.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), zoomed.shape[2:], True)
  )
  np.testing.assert_allclose(got, zoomed.transpose(0, 2, 3, 1), rtol=0, atol=2e-6)


@pytest.mark.parametrize('h', [473, 474, 512, 713])
def test_stem_max_pool_matches_caffe(h):
  """Caffe rounds up: 237 -> 119 at 473, and one more row than PyTorch's floor at 474/512."""
  from pspnet_jax import ops

  x = np.random.default_rng(h).standard_normal((1, 2, (h - 1) // 2 + 1, 9)).astype(np.float32)
  layer = {'params': {'pooling_param': {'pool': 'MAX', 'kernel_size': 3, 'stride': 2, 'pad': 1}}}
  want = ref.pooling(layer, x).transpose(0, 2, 3, 1)
  got = np.asarray(ops.max_pool_3x3_s2(jnp.asarray(x.transpose(0, 2, 3, 1)), True))
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------
# The full-size ResNet-101 file: the format at its real size (270 MB, 375 layers).


def _expected_variables(layers, config):
  """The model's variables as the file's blobs say, by the port's rules written out again:
  Caffe names -> semseg keys, BGR -> RGB in the first conv, the Concat's blocks reordered."""
  by = {l['name']: l['blobs'] for l in layers if l['blobs']}
  out = {}

  def conv(key, name):
    out[f'{key}.kernel'] = by[name][0].transpose(2, 3, 1, 0)
    if len(by[name]) == 2:
      out[f'{key}.bias'] = by[name][1]
    return f'{name}/bn'

  def bn(key, name):
    for field, blob in zip(('weight', 'bias', 'running_mean', 'running_var'), by[name]):
      out[f'{key}.{field}'] = blob.reshape(-1)

  for i, name in enumerate(('conv1_1_3x3_s2', 'conv1_2_3x3', 'conv1_3_3x3')):
    bn(f'backbone.layer0.{3 * i + 1}', conv(f'backbone.layer0.{3 * i}', name))
  out['backbone.layer0.0.kernel'] = out['backbone.layer0.0.kernel'][:, :, ::-1]
  for k, n in enumerate(ref.BLOCKS[config.depth], start=1):
    for b in range(n):
      p, c = f'backbone.layer{k}.{b}', f'conv{k + 1}_{b + 1}'
      for j, role in enumerate(('1x1_reduce', '3x3', '1x1_increase'), start=1):
        bn(f'{p}.bn{j}', conv(f'{p}.conv{j}', f'{c}_{role}'))
      if b == 0:
        bn(f'{p}.downsample.1', conv(f'{p}.downsample.0', f'{c}_1x1_proj'))
  for i, b in enumerate((1, 2, 3, 6)):
    bn(f'ppm.features.{i}.2', conv(f'ppm.features.{i}.1', f'conv5_3_pool{b}_conv'))
  bn('cls.1', conv('cls.0', 'conv5_4'))
  c4, r = 2048, 512  # Caffe: [conv5_3, pool6, pool3, pool2, pool1] -> [conv5_3, 1, 2, 3, 6]
  blocks = {
    'x': range(0, c4),
    6: range(c4, c4 + r),
    3: range(c4 + r, c4 + 2 * r),
    2: range(c4 + 2 * r, c4 + 3 * r),
    1: range(c4 + 3 * r, c4 + 4 * r),
  }
  order = np.concatenate([np.asarray(blocks[k]) for k in ('x', 1, 2, 3, 6)])
  out['cls.0.kernel'] = out['cls.0.kernel'][:, :, order]
  conv('cls.4', 'conv6')
  return out


@pytest.mark.parity
def test_full_size_pspnet101_file(tmp_path):
  layers = ref.pspnet_net(101, 19, 713, seed=5)
  small = _images(1, 97, 6)
  # Statistics measured up to the last block on small images (the pyramid's Interp sizes fit
  # 713 only); the pyramid's and head's BNs keep mean 0, variance 1.
  ref.forward(layers, ref.caffe_input(_images(2, 97, 7)), calibrate=True, until='conv5_3/relu')
  file_layers = ref.insert_splits(layers, inputs=('data',))
  path = ref.write_caffemodel(
    tmp_path / 'pspnet101_cityscapes.caffemodel', file_layers, inputs=('data',)
  )
  assert os.path.getsize(path) > 250e6
  model, config = load_caffe(path)
  assert config == PSPNetConfig(
    num_classes=19,
    depth=101,
    stride_in_1x1=True,
    ceil_mode=True,
    pyramid_fixed_size=90,
    mean=CAFFE_MEAN,
    std=CAFFE_STD,
  )
  want = _expected_variables(layers, config)
  got = {
    '.'.join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  }
  assert sorted(k for k in got if not k.startswith('aux.')) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  features = np.asarray(
    jax.jit(lambda m, x: m.backbone(x)[-1])(model, jnp.asarray(small - np.float32(CAFFE_MEAN)))
  )
  blob = ref.forward(layers, ref.caffe_input(small), until='conv5_3/relu')['conv5_3']
  err = np.abs(features - blob.transpose(0, 2, 3, 1)).max() / np.abs(blob).max()
  print(f'layer4 features at 97x97: max|error| / max|value| = {err:.2g}')
  assert err <= 1e-4


# ---------------------------------------------------------------------------------------
# The CLI end to end, and damaged files.


def test_cli_port_then_predict_and_eval(tmp_path):
  """port (auto-detected, checked against its prototxt) -> predict -> eval.py, on a net of
  the synthetic dataset's 4 classes."""
  from PIL import Image

  built = build(tmp_path, 50, 4, 473, seed=8)
  out = tmp_path / 'ported'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pspnet_jax.port',
      built.path,
      '--prototxt',
      built.prototxt,
      '--out',
      out,
    ],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=_env(),
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'layout:  caffe (auto-detected from its .caffemodel name)' in proc.stdout
  assert 'agrees with the file' in proc.stdout and 'aux freshly initialised' in proc.stdout
  model = checkpoint.load_model(out)
  assert model.config.mean == CAFFE_MEAN and model.config.pyramid_fixed_size == 60
  meta = checkpoint.model_metadata(out)
  assert meta['layout'] == 'caffe' and meta['caffe']['crop_size'] == 473 and meta['fresh_aux']

  images = tmp_path / 'images'
  images.mkdir()
  Image.fromarray(_images(1, 96, 9)[0].astype(np.uint8)).save(images / 'a.png')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pspnet_jax.predict',
      images,
      '--checkpoint',
      out,
      '--out',
      tmp_path / 'preds',
      '--mode',
      'whole',
      '--base-size',
      '96',
      '--no-flip',
    ],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=_env(),
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.asarray(Image.open(tmp_path / 'preds' / 'a.png')).shape == (96, 96)

  from pspnet_jax import data

  data_dir = tmp_path / 'data'
  data.prepare('synthetic_shapes', str(data_dir), image_size=32, num_train=8, num_val=2)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, 'eval.py'),
      '--config',
      os.path.join(REPO, 'configs', 'synthetic.py'),
      '--checkpoint',
      str(out),
      '--out',
      str(tmp_path / 'eval'),
      f'--config.dataset.data_dir={data_dir}',
      '--config.dataset.builder_kwargs.image_size=32',
      '--config.eval.mode=whole',
      '--config.eval.base_size=32',
      '--config.eval.flip=False',
    ],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=_env(),
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(tmp_path / 'eval' / 'metrics.json')


@pytest.mark.parity
def test_export_of_a_caffe_port_normalises_with_its_mean_and_runs_at_any_size(ade20k50, tmp_path):
  """The artifact holds the Caffe mean (std 1) and Caffe's pooling under symbolic sizes."""
  from pspnet_jax import export

  model, _ = load_caffe(ade20k50.path)
  checkpoint.save_model(tmp_path / 'model', model)
  manifest = export.export_model(str(tmp_path / 'model'), str(tmp_path / 'out'), platforms=('cpu',))
  assert manifest['normalization']['mean'] == list(CAFFE_MEAN)
  assert manifest['normalization']['std'] == list(CAFFE_STD)
  exported = jax.export.deserialize(open(tmp_path / 'out' / export.STABLEHLO_FILE, 'rb').read())
  rgb = _images(1, 97, 11)[:, :, :90]  # Caffe's windows sized for 60x60 features, on 13x12
  got, want = np.asarray(exported.call(rgb)), ported_logits(model, rgb)
  assert got.shape == (1, 97, 90, 150) and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _damaged(tmp_path, layers, edit, name='damaged.caffemodel'):
  layers = [dict(l, blobs=list(l['blobs']), params=dict(l['params'])) for l in layers]
  edit({l['name']: l for l in layers}, layers)
  return ref.write_caffemodel(tmp_path / name, layers, inputs=('data',))


def _refused(path, *needles):
  with pytest.raises(PortError) as e:
    load_caffe(path)
  message = str(e.value)
  assert '\n' not in message and str(path) in message, message
  for needle in needles:
    assert needle in message, message
  return message


@pytest.fixture(scope='module')
def small_deploy():
  return ref.pspnet_net(50, 5, 473, width=4, head=8, seed=9)  # statistics do not matter here


@pytest.fixture(scope='module')
def small_layers(small_deploy):
  return ref.insert_splits(small_deploy, inputs=('data',))


def test_a_missing_blob_is_named(small_layers, tmp_path):
  def edit(by, _):
    by['conv3_2_3x3/bn']['blobs'].pop()

  _refused(_damaged(tmp_path, small_layers, edit), "'conv3_2_3x3/bn'", 'holds 3 blobs')


def test_a_blob_of_the_wrong_shape_is_named(small_layers, tmp_path):
  def edit(by, _):
    w = by['conv4_3_1x1_reduce']['blobs'][0]
    by['conv4_3_1x1_reduce']['blobs'][0] = np.zeros((w.shape[0], w.shape[1] // 2, 1, 1), np.float32)

  _refused(
    _damaged(tmp_path, small_layers, edit), "'conv4_3_1x1_reduce'", 'blob 0 (weights) has shape'
  )


def test_leftover_blobs_are_named(small_layers, tmp_path):
  def extra_bias(by, _):
    by['conv5_4']['blobs'].append(np.zeros(8, np.float32))

  _refused(_damaged(tmp_path, small_layers, extra_bias), "'conv5_4'", 'holds 2 blobs')

  def blob_on_relu(by, _):
    by['conv2_2/relu']['blobs'] = [np.zeros((1, 16, 1, 1), np.float32)]

  _refused(
    _damaged(tmp_path, small_layers, blob_on_relu), "'conv2_2/relu'", 'a ReLU layer has none'
  )


def test_an_unknown_layer_type_is_named(small_layers, tmp_path):
  def edit(by, _):
    by['conv5_4/dropout']['type'] = 'Scale'

  _refused(
    _damaged(tmp_path, small_layers, edit), "'conv5_4/dropout'", "unknown layer type 'Scale'"
  )


def test_a_missing_layer_or_changed_geometry_is_named(small_layers, tmp_path):
  def no_layer(_, layers):
    layers[:] = [
      l for l in layers if l['name'] not in ('conv4_3_3x3', 'conv4_3_3x3/bn', 'conv4_3_3x3/relu')
    ]
    by = {l['name']: l for l in layers}
    by['conv4_3_1x1_increase']['bottom'] = ['conv4_3_1x1_reduce']

  _refused(
    _damaged(tmp_path, small_layers, no_layer),
    "'conv4_2'",
    'the residual blocks end here',
    "'conv4_3_1x1_reduce'",
  )

  def no_dilation(by, _):
    by['conv5_2_3x3']['params']['convolution_param'] = dict(
      by['conv5_2_3x3']['params']['convolution_param'], dilation=[1], pad=[1]
    )

  _refused(_damaged(tmp_path, small_layers, no_dilation), "'conv5_2_3x3'", 'dilation 1 where')


def test_truncated_and_foreign_files_get_one_line(small_layers, tmp_path):
  path = ref.write_caffemodel(tmp_path / 'whole.caffemodel', small_layers, inputs=('data',))
  data = open(path, 'rb').read()
  (tmp_path / 'cut.caffemodel').write_bytes(data[: len(data) // 2])
  _refused(tmp_path / 'cut.caffemodel', 'truncated', 'runs past the end of the file')
  (tmp_path / 'text.caffemodel').write_text('layer { name: "x" }')
  _refused(tmp_path / 'text.caffemodel')
  # A PyTorch file given --layout caffe, and a .caffemodel given a prototxt of another net.
  (tmp_path / 'zip.pth').write_bytes(b'PK\x03\x04' + bytes(100))
  with pytest.raises(PortError, match='not a Caffe .caffemodel'):
    port_checkpoint(tmp_path / 'zip.pth', 'caffe')


def test_a_prototxt_of_another_net_is_refused(ade20k50, tmp_path):
  path, deploy = ade20k50.path, ade20k50.deploy
  other = [dict(l, params=dict(l['params'])) for l in deploy]
  conv = next(l for l in other if l['name'] == 'conv5_3_pool6')
  conv['params'] = {
    'pooling_param': dict(conv['params']['pooling_param'], kernel_size=15, stride=15)
  }
  bad = ref.write_prototxt(tmp_path / 'other.prototxt', other, 473)
  with pytest.raises(
    PortError, match=r"layer 'conv5_3_pool6': pooling_param.kernel_size is 15 here and 10"
  ):
    load_caffe(path, bad)
  wrong_size = ref.write_prototxt(tmp_path / 'size.prototxt', deploy, 713)
  with pytest.raises(
    PortError, match='input 713x713 gives 90x90 features, but the pyramid is sized for 60x60'
  ):
    load_caffe(path, wrong_size)


def test_cli_refusal_is_one_line(small_layers, tmp_path):
  def edit(by, _):
    by['conv3_2_3x3/bn']['blobs'].pop()

  path = _damaged(tmp_path, small_layers, edit)
  proc = subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.port', path, '--out', tmp_path / 'out'],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=_env(),
    cwd=REPO,
  )
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error: ') and "'conv3_2_3x3/bn'" in proc.stderr
  assert not os.path.exists(tmp_path / 'out')


def test_backbone_only_port_and_its_config(ade20k50):
  path = ade20k50.path
  ported = port_checkpoint(path, backbone_only=True, num_classes=3, seed=2)
  assert ported.config.num_classes == 3 and ported.backbone_only and not ported.fresh_aux
  assert 'conv6' in ported.dropped['PSPNet heads (ppm, cls, aux): backbone-only port']
  with pytest.raises(PortError, match='classifies 150 classes'):
    port_checkpoint(path, num_classes=21)
  assert dataclasses.replace(ported.config, num_classes=150).pyramid_fixed_size == 60


# ---- the reader's stages, each on its own (parse -> layer graph -> match -> weights) ------


def _caffe_names(blocks=(3, 4, 6, 3)):
  """pspnet_jax's module prefix -> the layer the released prototxts name for it (their
  naming, written out here: conv<stage>_<block>_1x1_reduce / _3x3 / _1x1_increase / _proj,
  each with '/bn'; conv5_3_pool<bin>_conv; conv5_4; conv6)."""
  names = {}
  for k, name in enumerate(('conv1_1_3x3_s2', 'conv1_2_3x3', 'conv1_3_3x3')):
    names[f'layer0.{3 * k}'], names[f'layer0.{3 * k + 1}'] = name, f'{name}/bn'
  for s, n in enumerate(blocks, start=1):
    for b in range(n):
      caffe, ours = f'conv{s + 1}_{b + 1}', f'layer{s}.{b}'
      parts = [('conv1', 'bn1', '1x1_reduce'), ('conv2', 'bn2', '3x3')]
      parts += [('conv3', 'bn3', '1x1_increase')]
      if b == 0:
        parts.append(('downsample.0', 'downsample.1', '1x1_proj'))
      for conv, bn, suffix in parts:
        names[f'{ours}.{conv}'], names[f'{ours}.{bn}'] = f'{caffe}_{suffix}', f'{caffe}_{suffix}/bn'
  for i, b in enumerate((1, 2, 3, 6)):
    names[f'ppm.features.{i}.1'] = f'conv5_3_pool{b}_conv'
    names[f'ppm.features.{i}.2'] = f'conv5_3_pool{b}_conv/bn'
  names.update({'cls.0': 'conv5_4', 'cls.1': 'conv5_4/bn', 'cls.4': 'conv6'})
  return names


@pytest.fixture(scope='module')
def small_files(small_deploy, small_layers, tmp_path_factory):
  """The small net as a .caffemodel (Splits inserted) and as its deploy prototxt (no blobs)."""
  tmp = tmp_path_factory.mktemp('stages')
  model = ref.write_caffemodel(tmp / 'small.caffemodel', small_layers, inputs=('data',))
  return model, ref.write_prototxt(tmp / 'small.prototxt', small_deploy, 473), small_deploy


def test_stage_parse_reads_each_layer_as_written(small_layers, small_files):
  """caffe_format alone: names, types, blobs and parameters as the writer put them."""
  from pspnet_jax.port.caffe_format import read_caffemodel, read_prototxt

  model, prototxt, deploy = small_files
  net = read_caffemodel(model)
  assert net.inputs == ['data']
  for got, want in zip(net.layers, small_layers, strict=True):
    assert (got.name, got.type, got.bottoms, got.tops) == (
      want['name'],
      want['type'],
      want['bottom'],
      want['top'],
    )
    assert len(got.blobs) == len(want['blobs'])
    for a, b in zip(got.blobs, want['blobs']):
      assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
  by = {l.name: l for l in net.layers}
  assert by['conv5_2_3x3'].param('convolution_param', 'dilation') == [4]
  assert by['conv5_2_3x3'].param('convolution_param', 'group') == 1  # caffe.proto's default
  assert by['conv6'].param('convolution_param', 'bias_term') is True
  assert by['conv5_3_pool6'].param('pooling_param', 'pool') == 'AVE'
  assert by['conv6_interp'].has('interp_param', 'zoom_factor')
  assert not by['conv6_interp'].has('interp_param', 'height')
  text = read_prototxt(prototxt)
  assert [l.name for l in text.layers] == [l['name'] for l in deploy]
  assert not any(l.blobs for l in text.layers) and text.input_shapes == [(1, 3, 473, 473)]
  f32 = lambda params: {
    m: {k: np.float32(v) if isinstance(v, float) else v for k, v in f.items()}
    for m, f in params.items()
  }
  for layer in text.layers:  # the text's parameters are the binary's (floats are float32 there)
    assert f32(layer.params) == f32(by[layer.name].params), layer.name


def test_stage_layer_graph_follows_in_place_layers_and_splits(small_files):
  """LayerGraph alone: producers by blob version, shape-keeping layers traced, Splits
  crossed; a blob no layer writes and a repeated name refused."""
  from pspnet_jax.port.caffe import LayerGraph
  from pspnet_jax.port.caffe_format import read_caffemodel

  net = read_caffemodel(small_files[0])
  g = LayerGraph(net)
  at = g.by_name
  # conv1_1's BN and ReLU write its blob in place: conv1_2 reads the ReLU's version.
  assert g.inputs[at['conv1_2_3x3']] == [at['conv1_1_3x3_s2/relu']]
  assert g.input_of(at['conv1_2_3x3']) == (
    at['conv1_1_3x3_s2'],
    ('BN', 'ReLU'),
    [at['conv1_1_3x3_s2/bn'], at['conv1_1_3x3_s2/relu']],
  )
  assert g.inputs[at['conv1_1_3x3_s2']] == [None]  # the net's input
  # The first block's sum: the projection and the increase conv, each through its BN.
  sources = {g.layers[g.trace(d)[0]].name: g.trace(d)[1] for d in g.inputs[at['conv2_1']]}
  assert sources == {'conv2_1_1x1_proj': ('BN',), 'conv2_1_1x1_increase': ('BN',)}
  # The trunk's output is read through a Split by the four pools and the Concat.
  assert 'Split' in {l.type for l in net.layers}
  assert sorted(g.layers[j].name for j in g.readers(at['conv5_3'])) == sorted(
    ['conv5_3_pool1', 'conv5_3_pool2', 'conv5_3_pool3', 'conv5_3_pool6', 'conv5_3_concat']
  )
  assert at['conv6_interp'] not in g.ancestors(at['conv6'])
  assert at['conv1_1_3x3_s2'] in g.ancestors(at['conv6'])
  edit = lambda l: dataclasses.replace(l, bottoms=['nowhere']) if l.name == 'conv6' else l
  with pytest.raises(PortError, match="layer 'conv6' reads blob 'nowhere', which no earlier"):
    LayerGraph(dataclasses.replace(net, layers=[edit(l) for l in net.layers]))
  twice = net.layers + [dataclasses.replace(net.layers[-1])]
  with pytest.raises(PortError, match="two layers are named 'conv6_interp'"):
    LayerGraph(dataclasses.replace(net, layers=twice))


def test_stage_match_places_every_module_from_parameters_alone(small_files):
  """match alone, on the deploy prototxt (no blob in it): each module's layer, its expected
  weight shape, the config fields and the Concat's order; the weights stage then refuses the
  blob-less layers, naming the first."""
  from pspnet_jax.port.caffe import LayerGraph, match, take_weights
  from pspnet_jax.port.caffe_format import read_prototxt

  g = LayerGraph(read_prototxt(small_files[1]))
  found = match(g)
  assert {p: g.layers[s.layer].name for p, s in found.slots.items()} == _caffe_names()
  w = 4  # small_layers' width: the stem's 4, 4, 8 channels; planes 4, 8, 16, 32
  shapes = {
    'layer0.0': (w, 3, 3, 3),
    'layer0.7': (2 * w,),
    'layer1.0.conv1': (w, 2 * w, 1, 1),
    'layer1.0.downsample.0': (4 * w, 2 * w, 1, 1),
    'layer4.2.conv2': (8 * w, 8 * w, 3, 3),
    'ppm.features.3.1': (8 * w, 32 * w, 1, 1),
    'cls.0': (8, 64 * w, 3, 3),
    'cls.4': (5, 8, 1, 1),
  }
  assert {p: found.slots[p].shape for p in shapes} == shapes
  assert [p for p, s in found.slots.items() if s.bias] == ['cls.4']
  config = found.config
  assert (config['output_stride'], config['bins'], config['pyramid_fixed_size']) == (
    8,
    (1, 2, 3, 6),
    60,
  )
  assert config['stride_in_1x1'] and not config['contract_dilation'] and found.feature_size == 60
  assert found.head_input == (
    ('features', 32 * w),
    ('bin 6', 8 * w),
    ('bin 3', 8 * w),
    ('bin 2', 8 * w),
    ('bin 1', 8 * w),
  )
  with pytest.raises(PortError, match="layer 'conv1_1_3x3_s2': holds 0 blobs"):
    take_weights(g, found)


def test_stage_weights_take_each_matched_blob(small_layers, small_files):
  """take_weights alone: every tensor is its layer's blob (this test's name table), the first
  conv's input channels reversed (BGR -> RGB), the head conv's input blocks moved from the
  Concat's [features, bin 6, bin 3, bin 2, bin 1] to [features, bin 1, bin 2, bin 3, bin 6]."""
  from pspnet_jax.port.caffe import LayerGraph, match, take_weights
  from pspnet_jax.port.caffe_format import read_caffemodel

  g = LayerGraph(read_caffemodel(small_files[0]))
  canonical, file_keys = take_weights(g, match(g))
  blobs = {l['name']: l['blobs'] for l in small_layers}
  want = {}
  for prefix, name in _caffe_names().items():
    b = blobs[name]
    if name.endswith('/bn'):
      for k, field in enumerate(('weight', 'bias', 'running_mean', 'running_var')):
        want[f'{prefix}.{field}'] = b[k].reshape(-1)
    else:
      want[f'{prefix}.weight'] = b[0]
      if len(b) == 2:
        want[f'{prefix}.bias'] = b[1]
  want['layer0.0.weight'] = want['layer0.0.weight'][:, [2, 1, 0]]
  head = want['cls.0.weight']  # features 128, then four branches of 32
  blocks = {'features': head[:, :128], 6: head[:, 128:160], 3: head[:, 160:192]}
  blocks.update({2: head[:, 192:224], 1: head[:, 224:256]})
  want['cls.0.weight'] = np.concatenate([blocks[k] for k in ('features', 1, 2, 3, 6)], axis=1)
  assert sorted(canonical) == sorted(want)
  for key in want:
    assert np.array_equal(canonical[key], want[key]), key
  assert file_keys['layer4.0.bn2.running_var'] == 'conv5_1_3x3/bn blob 3'
  assert file_keys['cls.4.bias'] == 'conv6 blob 1'
