"""MobileNetV2 PSPNet (mmseg ``mobilenet-v2-d8_pspnet``) against the independent PyTorch
reference in mmseg's key names (tests/torch_mobilenet_reference.py): forward in eval and
train mode, the port of an mmseg ``{meta, state_dict}`` file (CLI and load_torch), the
ImageNet initialisations (mmcls and torchvision layouts) on every backbone output, and a
removed key refused by name.

Full width (MobileNetV2 is light) at small inputs: 96x96 (features 12x12, a multiple of
every bin) and 70x90 (features 9x12, overlapping bins).
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_model_parity import assert_logits_close, assert_train_mode_matches, forward, run_torch
from test_port import port_twice
from torch_mobilenet_reference import SETTINGS, TorchMobileNetPSPNet, TorchMobileNetV2
from torch_reference import randomize, state_dict_numpy

from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.port import LAYOUTS, StateDictMismatch, load_state_dict, load_torch

torch.set_num_threads(2)
SIZES = ((2, 96, 96), (1, 70, 90))
MMSEG = dict(backbone='mobilenet_v2', align_corners=False, ppm_channels=512)
MMSEG_LAYOUT = LAYOUTS['mmseg-mobilenet_v2']


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES]


def canonical(state_dict):
  return MMSEG_LAYOUT.to_canonical(state_dict, backbone_only=False, source='reference')[0]


def build_pair(seed, **kw):
  config = PSPNetConfig(**MMSEG, **kw)
  ref = randomize(
    TorchMobileNetPSPNet(num_classes=config.num_classes, dropout=config.dropout), seed=seed
  )
  model = PSPNet(config, rngs=nnx.Rngs(seed))
  load_state_dict(model, canonical(state_dict_numpy(ref)), source='reference state dict')
  return ref, model


@pytest.fixture(scope='module')
def mmseg_file(tmp_path_factory):
  ref = randomize(TorchMobileNetPSPNet(num_classes=19), seed=21)
  path = tmp_path_factory.mktemp('mnv2') / 'pspnet_m-v2-d8_512x1024_80k_cityscapes.pth'
  torch.save(
    {
      'meta': {'mmseg_version': '0.11.0', 'CLASSES': [f'c{i}' for i in range(19)]},
      'state_dict': ref.state_dict(),
    },
    path,
  )
  return ref, str(path)


@pytest.mark.parity
def test_mmseg_checkpoint_ports_to_the_same_logits(mmseg_file, tmp_path):
  """The CLI and load_torch(layout='auto') on an mmseg file: same config, same logits."""
  ref, src = mmseg_file
  cli_model, api_model, stdout = port_twice(src, tmp_path / 'out')
  assert 'layout:  mmseg-mobilenet_v2 (auto-detected' in stdout
  assert 'backbone=mobilenet_v2' in stdout and 'ported from the checkpoint' in stdout
  assert api_model.config == PSPNetConfig(num_classes=19, **MMSEG)
  for x in inputs():
    want = run_torch(ref, x)
    for model in (cli_model, api_model):
      assert_logits_close(forward(model, jnp.asarray(x)), want)


@pytest.mark.parity
def test_train_mode_forward_and_bn_update_match_torch():
  """As for ResNet (tests/test_model_parity.py): PyTorch float64 is the reference, JAX
  float32 within 2x of PyTorch float32's own distance to it, on both outputs and on every
  BN running statistic after one train-mode forward, at the overlapping-bins size (batch 2:
  train-mode BN of the 1x1 bin needs two values per channel)."""
  ref, model = build_pair(22, num_classes=6, dropout=0.0)
  x = np.random.default_rng(2).standard_normal((2,) + SIZES[1][1:] + (3,)).astype(np.float32)
  assert_train_mode_matches(model, ref, x, canonical)


def test_removed_key_is_refused_by_name(mmseg_file, tmp_path):
  ref, _ = mmseg_file
  state = {
    k: v for k, v in ref.state_dict().items() if k != 'backbone.layer4.0.conv.1.bn.running_var'
  }
  torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'm.pth')
  with pytest.raises(
    StateDictMismatch,
    match=r'missing keys \(1\):\n'
    r'  layer4\.0\.conv\.1\.bn\.running_var: '
    r'model expects \(192,\)',
  ):
    load_torch(tmp_path / 'm.pth')


def test_parameter_count_equals_torch():
  abstract = nnx.eval_shape(
    lambda: PSPNet(PSPNetConfig(num_classes=150, **MMSEG), rngs=nnx.Rngs(0))
  )
  n_jax = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert n_jax == sum(p.numel() for p in TorchMobileNetPSPNet(num_classes=150).parameters())


# ---------------------------------------------------------------------------------------
# ImageNet initialisations: backbone only, compared on all four backbone outputs.


def mmcls_names(backbone_state):
  """mmcls's ImageNet file: the backbone under ``backbone.``, plus its classifier."""
  g = torch.Generator().manual_seed(0)
  return {
    **{f'backbone.{k}': v for k, v in backbone_state.items()},
    'backbone.conv2.conv.weight': torch.randn(1280, 320, 1, 1, generator=g),
    'backbone.conv2.bn.weight': torch.ones(1280),
    'head.fc.weight': torch.randn(1000, 1280),
    'head.fc.bias': torch.zeros(1000),
  }


def torchvision_names(backbone_state):
  """torchvision's ``mobilenet_v2().state_dict()`` names: ``features.{n}`` in block order."""
  index, n = {}, 1
  for layer, (_, _, blocks) in enumerate(SETTINGS, start=1):
    for j in range(blocks):
      index[f'layer{layer}.{j}'] = n
      n += 1
  out = {}
  for key, value in backbone_state.items():
    if key.startswith('conv1.'):
      out[
        'features.0.' + key[len('conv1.') :].replace('conv.', '0.', 1).replace('bn.', '1.', 1)
      ] = value
      continue
    block, k, kind, rest = re.match(r'(layer\d\.\d+)\.conv\.(\d)\.(conv|bn)\.(.*)', key).groups()
    last = int(k) == (1 if block == 'layer1.0' else 2)  # the projection: conv.{n}, bn conv.{n+1}
    sub = f'{int(k) + (kind == "bn")}' if last else f'{k}.{0 if kind == "conv" else 1}'
    out[f'features.{index[block]}.conv.{sub}.{rest}'] = value
  out['features.18.0.weight'] = torch.zeros(1280, 320, 1, 1)  # the 320 -> 1280 Conv-BN-ReLU6
  out.update(
    {
      f'features.18.1.{k}': torch.ones(1280)
      for k in ('weight', 'bias', 'running_mean', 'running_var')
    }
  )
  out['features.18.1.num_batches_tracked'] = torch.tensor(0)
  out['classifier.1.weight'], out['classifier.1.bias'] = torch.zeros(1000, 1280), torch.zeros(1000)
  # torchvision's mobilenet_v2().state_dict() holds 314 entries: 52 convs, 52 BNs of five
  # entries each, the classifier's weight and bias (torchvision/models/mobilenetv2.py).
  assert len(out) == 314, len(out)
  return out


@nnx.jit
def backbone_outputs(model, x):
  return model.backbone(x)


@pytest.mark.parity
@pytest.mark.parametrize(
  'names,layout',
  [(mmcls_names, 'mmcls-mobilenet_v2'), (torchvision_names, 'torchvision-mobilenet_v2')],
)
def test_imagenet_backbone_ports(names, layout, tmp_path):
  ref = randomize(TorchMobileNetV2(), seed=23)
  torch.save(names(ref.state_dict()), tmp_path / 'mobilenet_v2.pth')
  ported = load_torch(tmp_path / 'mobilenet_v2.pth', num_classes=5)
  assert ported[1] == PSPNetConfig(num_classes=5, **MMSEG)
  x = inputs(3)[1]
  with torch.no_grad():
    want = [o.numpy().transpose(0, 2, 3, 1) for o in ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))]
  got = backbone_outputs(ported[0], jnp.asarray(x))
  for g, w in zip(got, want, strict=True):
    assert_logits_close(g, w)
  assert LAYOUTS[layout].recognise(torch.load(tmp_path / 'mobilenet_v2.pth'))
