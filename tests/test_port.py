"""Porting PyTorch checkpoints: every layout through load_torch and the CLI, against the
independent PyTorch reference (tests/torch_reference.py), plus every error path.

Checkpoints are built the way the real ones are saved: semseg ``{'epoch', 'state_dict',
'optimizer'}`` with ``module.`` keys, mmseg ``{'meta', 'state_dict'}`` with mmseg's key
names (renamed here from the reference's semseg names by the test's own table), bare
ImageNet state dicts with ``fc.*``. Heads are compared on logits, backbone-only ports on
layer4 features, at an input whose features are a multiple of the bins (96 -> 12) and one
whose features are not (70x90 -> 9x12).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cli import cli_env
from flax import nnx
from test_model_parity import assert_logits_close, forward, run_torch
from torch_reference import TorchPSPNet, TorchResNet, randomize

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.port import LAYOUTS, PortError, StateDictMismatch, load_torch, port_checkpoint
from pspnet_jax.port.architecture import infer_config
from pspnet_jax.port.reader import read_state_dict

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((2, 96, 96), (1, 70, 90))
CLI_TIMEOUT_S = 300

# The reference's semseg names -> mmseg's real names (mmseg PSPHead / FCNHead / ResNetV1c).
MMSEG_NAMES = (
  ('layer0.', 'backbone.stem.'),
  ('layer1.', 'backbone.layer1.'),
  ('layer2.', 'backbone.layer2.'),
  ('layer3.', 'backbone.layer3.'),
  ('layer4.', 'backbone.layer4.'),
  ('cls.0.', 'decode_head.bottleneck.conv.'),
  ('cls.1.', 'decode_head.bottleneck.bn.'),
  ('cls.4.', 'decode_head.conv_seg.'),
  ('aux.0.', 'auxiliary_head.convs.0.conv.'),
  ('aux.1.', 'auxiliary_head.convs.0.bn.'),
  ('aux.4.', 'auxiliary_head.conv_seg.'),
)
IMAGENET_NAMES = (
  ('layer0.0.', 'conv1.'),
  ('layer0.1.', 'bn1.'),
  ('layer0.3.', 'conv2.'),
  ('layer0.4.', 'bn2.'),
  ('layer0.6.', 'conv3.'),
  ('layer0.7.', 'bn3.'),
)
TORCHVISION_NAMES = (('layer0.0.', 'conv1.'), ('layer0.1.', 'bn1.'))


def rename(state_dict, table):
  out = {}
  for key, value in state_dict.items():
    m = re.match(r'ppm\.features\.(\d+)\.([12])\.(.*)', key)
    if m and table is MMSEG_NAMES:
      key = f'decode_head.psp_modules.{m[1]}.1.{"conv" if m[2] == "1" else "bn"}.{m[3]}'
    else:
      key = next((new + key[len(old) :] for old, new in table if key.startswith(old)), key)
    out[key] = value
  return out


def with_fc(state_dict, channels, seed=0):
  g = torch.Generator().manual_seed(seed)
  return {
    **state_dict,
    'fc.weight': torch.randn(1000, channels, generator=g),
    'fc.bias': torch.randn(1000, generator=g),
  }


def save_semseg(ref, path, legacy=False):
  """As semseg's train.py saves: DataParallel keys, epoch and SGD state (momentum buffers).

  ``legacy``: torch.save's pre-1.6 pickle format, which the published semseg files predate.
  """
  opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
  for p in list(ref.parameters())[:3]:
    opt.state[p]['momentum_buffer'] = torch.zeros_like(p)
  torch.save(
    {
      'epoch': 50,
      'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()},
      'optimizer': opt.state_dict(),
    },
    path,
    _use_new_zipfile_serialization=not legacy,
  )
  return str(path)


def save_mmseg(ref, path, num_classes):
  meta = {
    'mmseg_version': '0.30.0',
    'CLASSES': tuple(f'c{i}' for i in range(num_classes)),
    'PALETTE': [[i, i, i] for i in range(num_classes)],
    'iter': 40000,
  }
  torch.save({'meta': meta, 'state_dict': rename(ref.state_dict(), MMSEG_NAMES)}, path)
  return str(path)


def run_cli(*args, expect_ok=True):
  proc = subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.port', *map(str, args)],
    capture_output=True,
    text=True,
    timeout=CLI_TIMEOUT_S,
    env=cli_env(),
    cwd=REPO,
  )
  assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
  return proc


def port_twice(src, out_dir, *args):
  """(model from the CLI's model directory, model from load_torch, CLI stdout)."""
  proc = run_cli(src, '--out', out_dir, *args)
  cli_model = checkpoint.load_model(out_dir)
  cli_model.eval()
  flags = {'--layout': 'layout', '--num-classes': 'num_classes'}
  kw = {flags[flag]: value for flag, value in zip(args[::2], args[1::2])}
  api_model, config = load_torch(src, **kw)
  assert cli_model.config == config
  return cli_model, api_model, proc.stdout


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES]


def assert_logits_match(models, ref):
  for x in inputs():
    want = run_torch(ref, x)
    for model in models:
      assert_logits_close(forward(model, jnp.asarray(x)), want)


@nnx.jit
def layer4(model, x):
  return model.backbone(x)[-1]


def assert_layer4_match(models, torch_layer4):
  for x in inputs(1):
    with torch.no_grad():
      want = torch_layer4(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    for model in models:
      assert_logits_close(layer4(model, jnp.asarray(x)), want)


def variables(model):
  return {
    p: np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  }


def assert_same_variables(a, b):
  va, vb = variables(a), variables(b)
  assert va.keys() == vb.keys()
  for path in va:
    np.testing.assert_array_equal(va[path], vb[path], err_msg=str(path))


# ---------------------------------------------------------------------------------------
# Parity: each layout through the CLI and load_torch.


@pytest.mark.parity
def test_semseg_pspnet50_real_size(tmp_path):
  ref = randomize(TorchPSPNet(num_classes=21, depth=50), seed=11)
  src = save_semseg(ref, tmp_path / 'train_epoch_50.pth')
  cli_model, api_model, stdout = port_twice(src, tmp_path / 'out')
  assert 'layout:  semseg (auto-detected' in stdout and 'ported from the checkpoint' in stdout
  assert "state_dict unwrapped, ignored epoch, optimizer; 'module.' prefix stripped" in stdout
  assert api_model.config == PSPNetConfig(num_classes=21, depth=50)
  assert_same_variables(cli_model, api_model)
  assert_logits_match([api_model], ref)
  meta = checkpoint.read_model_config(str(tmp_path / 'out'))[1]
  assert meta['layout'] == 'semseg' and not meta['backbone_only']
  n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
  assert len(meta['dropped']['BN step counters (num_batches_tracked)']) == n_bn


MMSEG_SMALL = dict(
  num_classes=19,
  depth=50,
  base_width=16,
  stem='deep32',
  contract_dilation=True,
  align_corners=False,
  head_channels=32,
  aux_channels=16,
)


@pytest.fixture(scope='module')
def mmseg_checkpoint(tmp_path_factory):
  ref = randomize(TorchPSPNet(**MMSEG_SMALL), seed=12)
  return ref, save_mmseg(ref, tmp_path_factory.mktemp('mmseg') / 'pspnet_r50-d8.pth', 19)


@pytest.mark.parity
def test_mmseg_pspnet(mmseg_checkpoint, tmp_path):
  ref, src = mmseg_checkpoint
  cli_model, api_model, stdout = port_twice(
    src, tmp_path / 'out', '--layout', 'mmseg', '--num-classes', 19
  )
  assert 'layout:  mmseg (as asked)' in stdout
  assert api_model.config == PSPNetConfig(**MMSEG_SMALL)
  assert_logits_match([cli_model, api_model], ref)


def backbone_checkpoint(path, depth, stem, names, contract_dilation, seed):
  ref = randomize(
    TorchResNet(depth=depth, stem=stem, contract_dilation=contract_dilation, base_width=8),
    seed=seed,
  )
  torch.save(with_fc(rename(ref.state_dict(), names), ref.channels), path)
  return ref, str(path)


@pytest.mark.parity
def test_semseg_imagenet_backbone(tmp_path):
  ref, src = backbone_checkpoint(
    tmp_path / 'resnet50_v2.pth', 50, 'deep', IMAGENET_NAMES, False, 13
  )
  cli_model, api_model, stdout = port_twice(src, tmp_path / 'out', '--num-classes', 7)
  assert 'layout:  semseg-imagenet (auto-detected' in stdout
  assert 'freshly initialised' in stdout and 'fc.bias, fc.weight' in stdout
  assert api_model.config == PSPNetConfig(num_classes=7, depth=50, base_width=8)
  assert_layer4_match([cli_model, api_model], lambda x: ref(x)[1])
  logits = jax.eval_shape(api_model, jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32))
  assert logits.shape == (1, 33, 33, 7)  # eval mode: logits only, at input size
  meta = checkpoint.read_model_config(str(tmp_path / 'out'))[1]
  assert meta['backbone_only'] and meta['heads_seed'] == 0


@pytest.mark.parity
def test_torchvision_layout_backbone(tmp_path):
  # Basic blocks here (bottlenecks in the other layouts): both block kinds are inferred.
  ref, src = backbone_checkpoint(
    tmp_path / 'resnet18.pth', 18, 'torchvision', TORCHVISION_NAMES, True, 14
  )
  cli_model, api_model, stdout = port_twice(src, tmp_path / 'out')
  assert 'layout:  torchvision (auto-detected' in stdout
  assert api_model.config == PSPNetConfig(
    depth=18, base_width=8, stem='torchvision', contract_dilation=True
  )
  assert_layer4_match([cli_model, api_model], lambda x: ref(x)[1])


@pytest.mark.parity
def test_torchvision_layout_bottleneck_backbone(tmp_path):
  """torchvision's dilated ResNet-50 layout (conv1/bn1/layer*/fc.*, the 7x7 stem, and
  replace_stride_with_dilation's first blocks at half dilation, as the reference builds
  them): the bottleneck depth is inferred and layer4 matches. torchvision itself is not in
  the test environment, so this stands where a test of its own module was skipped on every
  run."""
  ref, src = backbone_checkpoint(
    tmp_path / 'resnet50.pth', 50, 'torchvision', TORCHVISION_NAMES, True, 15
  )
  model, config = load_torch(src, layout='torchvision')
  assert config == PSPNetConfig(depth=50, base_width=8, stem='torchvision', contract_dilation=True)
  assert_layer4_match([model], lambda x: ref(x)[1])


@pytest.mark.parity
def test_safetensors_needs_no_torch(mmseg_checkpoint, tmp_path, monkeypatch):
  from safetensors.numpy import save_file

  _, src = mmseg_checkpoint
  want = load_torch(src)[0]
  flat = torch.load(src, weights_only=True)['state_dict']
  save_file({k: v.numpy() for k, v in flat.items()}, tmp_path / 'pspnet.safetensors')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  got, config = load_torch(tmp_path / 'pspnet.safetensors')
  assert config == want.config
  assert_same_variables(got, want)
  os.rename(tmp_path / 'pspnet.safetensors', tmp_path / 'pspnet.pth')  # recognised by its header
  assert read_state_dict(tmp_path / 'pspnet.pth').kind == 'safetensors'


def test_backbone_only_port_of_a_full_checkpoint(mmseg_checkpoint):
  ref, src = mmseg_checkpoint
  full = load_torch(src)[0]
  ported = port_checkpoint(src, num_classes=3, backbone_only=True, seed=4)
  assert ported.config.num_classes == 3 and ported.seed == 4
  heads = [
    k
    for k in ref.state_dict()
    if k.startswith(('ppm.', 'cls.', 'aux.')) and not k.endswith('num_batches_tracked')
  ]
  assert len(ported.dropped['PSPNet heads (ppm, cls, aux): backbone-only port']) == len(heads)
  assert_same_variables(ported.model.backbone, full.backbone)


@pytest.mark.parity
def test_legacy_torch_save_format(small_semseg):
  """semseg's published files predate torch 1.6's zip format."""
  ref, src = small_semseg
  model, config = load_torch(src)
  assert config.num_classes == 5
  assert_logits_match([model], ref)


@pytest.mark.parametrize(
  'depth,stem', [(18, 'deep'), (34, 'torchvision'), (101, 'deep'), (152, 'deep32')]
)
def test_config_is_inferred_from_shapes(depth, stem):
  """Every depth and stem, from key shapes alone: those of the PyTorch reference's state
  dict, built on torch's meta device (no arrays are allocated)."""
  want = PSPNetConfig(
    num_classes=11, depth=depth, stem=stem, base_width=32, head_channels=64, aux_channels=48
  )
  with torch.device('meta'):
    ref = TorchPSPNet(
      num_classes=11, depth=depth, stem=stem, base_width=32, head_channels=64, aux_channels=48
    )
  state = {
    k: np.broadcast_to(np.float32(0), tuple(v.shape))
    for k, v in ref.state_dict().items()
    if not k.endswith('num_batches_tracked')
  }
  assert state['layer1.0.conv1.weight'].shape[0] == 32 and state['cls.4.weight'].shape[:2] == (
    11,
    64,
  )
  got = infer_config(state, LAYOUTS['semseg'], with_heads=True, num_classes=None, source='x')
  assert got == want


# ---------------------------------------------------------------------------------------
# Errors: one exception naming the file / keys and shapes, one line where it is a file.


@pytest.fixture(scope='module')
def small_semseg(tmp_path_factory):
  ref = randomize(
    TorchPSPNet(num_classes=5, depth=18, base_width=8, head_channels=16, aux_channels=8), seed=16
  )
  return ref, save_semseg(ref, tmp_path_factory.mktemp('semseg') / 'train_epoch_1.pth', legacy=True)


def edited(ref, path, drop=(), replace=None):
  state = {k: v for k, v in ref.state_dict().items() if k not in drop}
  state.update(replace or {})
  torch.save({'state_dict': state}, path)
  return path


def test_missing_key_is_named_with_its_shape(small_semseg, tmp_path):
  ref, _ = small_semseg
  src = edited(ref, tmp_path / 'm.pth', drop=['layer2.1.bn2.running_var'])
  with pytest.raises(
    StateDictMismatch,
    match=r'missing keys \(1\):\n'
    r'  layer2\.1\.bn2\.running_var: '
    r'model expects \(16,\)',
  ):
    load_torch(src)


def test_misshaped_and_extra_keys_are_named_with_both_shapes(small_semseg, tmp_path):
  ref, _ = small_semseg
  src = edited(
    ref,
    tmp_path / 'm.pth',
    replace={
      'layer3.0.conv2.weight': torch.zeros(32, 32, 1, 1),
      'layer9.weight': torch.zeros(2, 3),
    },
  )
  with pytest.raises(StateDictMismatch) as e:
    load_torch(src)
  msg = str(e.value)
  assert str(src) in msg
  assert 'layer9.weight: (2, 3), the model has no such key' in msg
  assert 'layer3.0.conv2.weight: ' in msg
  assert 'has (32, 32, 1, 1), model expects (32, 32, 3, 3)' in msg


def test_mismatch_names_the_file_key_of_a_renamed_layout(mmseg_checkpoint, tmp_path):
  ref, _ = mmseg_checkpoint
  state = rename(ref.state_dict(), MMSEG_NAMES)
  state['auxiliary_head.conv_seg.weight'] = torch.zeros(18, 16, 1, 1)
  torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'm.pth')
  with pytest.raises(
    StateDictMismatch, match=re.escape('aux.4.weight (file key auxiliary_head.conv_seg.weight): ')
  ):
    load_torch(tmp_path / 'm.pth')


def test_conflicting_num_classes(small_semseg):
  _, src = small_semseg
  with pytest.raises(PortError, match=r'classifies 5 classes .* num_classes=21'):
    load_torch(src, num_classes=21)


def test_wrong_or_unknown_layout(small_semseg, tmp_path):
  _, src = small_semseg
  with pytest.raises(PortError, match=r"not a mmseg checkpoint \(it looks like \['semseg'\]"):
    load_torch(src, layout='mmseg')
  torch.save({'encoder.weight': torch.zeros(3)}, tmp_path / 'other.pth')
  with pytest.raises(PortError, match='cannot tell the layout'):
    load_torch(tmp_path / 'other.pth')


def test_corrupt_and_truncated_files_get_one_line(small_semseg, tmp_path):
  _, src = small_semseg
  data = open(src, 'rb').read()
  (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 2])
  (tmp_path / 'random.pth').write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / 'text.safetensors').write_text('not tensors')
  for name in ('truncated.pth', 'random.pth', 'text.safetensors', 'absent.pth'):
    with pytest.raises(PortError) as e:
      load_torch(tmp_path / name)
    assert str(tmp_path / name) in str(e.value) and '\n' not in str(e.value)
    assert e.value.__cause__ is None  # and no pickle traceback chained to it:
    assert e.value.__context__ is None or e.value.__suppress_context__


def test_cli_error_is_one_line_without_traceback(small_semseg, tmp_path):
  _, src = small_semseg
  data = open(src, 'rb').read()
  (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 3])
  proc = run_cli(tmp_path / 'truncated.pth', '--out', tmp_path / 'out', expect_ok=False)
  assert proc.stderr.strip().count('\n') == 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error: ') and 'truncated.pth' in proc.stderr
  assert not os.path.exists(tmp_path / 'out')


def test_pickled_objects_need_trust(small_semseg, tmp_path):
  ref, _ = small_semseg
  torch.save({'state_dict': ref.state_dict(), 'meta': {'hub': Opaque()}}, tmp_path / 'obj.pth')
  refused = r'Opaque, which torch.load\(weights_only=True\) refuses.*--trust-pickle'
  with pytest.raises(PortError, match=refused):
    load_torch(tmp_path / 'obj.pth')
  assert load_torch(tmp_path / 'obj.pth', trust_pickle=True)[1].num_classes == 5


class Opaque:
  """A Python object in a checkpoint, as mmengine's message hub is."""


def test_torch_absent_is_an_install_hint(small_semseg, monkeypatch):
  _, src = small_semseg
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(PortError, match='pip install torch'):
    load_torch(src)
