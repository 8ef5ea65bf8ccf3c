"""ShuffleNetV2 backbone (``backbone='shufflenet_v2'``) against an independent PyTorch
reference written here from the paper (Ma et al., "ShuffleNet V2", ECCV 2018, Fig. 3 (c),
(d) and Table 5) in torchvision's state-dict names (torchvision is not importable beside
torch 2.13 here): every backbone output undilated (output stride 32, torchvision's own
network) and dilated (output stride 8 against the reference with the same dilation), the
port of a torchvision file (auto-detected, CLI and load_torch), a missing or mis-shaped key
refused, the widths against torchvision's published parameter counts, and a whole PSPNet's
forward and train step.

Random weights (tests/torch_reference.py's ``randomize``), small inputs: 70x90 (odd
feature sizes after the max pool) and 64x64.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli import one_error_line
from flax import nnx
from test_model_parity import assert_logits_close
from test_port import run_cli
from torch import nn
from torch_reference import randomize, state_dict_numpy

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNet, PSPNetConfig, ShuffleNetV2
from pspnet_jax.port import LAYOUTS, StateDictMismatch, load_state_dict, load_torch
from pspnet_jax.port.mapping import PortError
from pspnet_jax.train import init_checkpoint
from pspnet_jax.train.optimizer import OptimizerConfig, make_optimizer
from pspnet_jax.train.step import make_train_step

torch.set_num_threads(2)
LAYOUT = 'torchvision-shufflenet_v2'
RECIPE = dict(backbone='shufflenet_v2', align_corners=False, ppm_channels=512)

# ---------------------------------------------------------------------------------------
# The reference: the paper's units, torchvision's module names.

# Table 5 of the paper: output channels of Conv1, Stage2-4, Conv5 per width; the 2x model's
# Conv5 has 2048. Units per stage 4, 8, 4; the first of each stage halves the resolution.
PAPER_WIDTHS = {
  0.5: (24, 48, 96, 192, 1024),
  1.0: (24, 116, 232, 464, 1024),
  1.5: (24, 176, 352, 704, 1024),
  2.0: (24, 244, 488, 976, 2048),
}
# torchvision's documented parameter counts of shufflenet_v2_x0_5 ... x2_0 (ImageNet
# classifier of 1000 classes included), pytorch/vision docs, models/shufflenetv2.
TORCHVISION_PARAMS = {0.5: 1_366_792, 1.0: 2_278_604, 1.5: 3_503_624, 2.0: 7_393_996}


def shuffle(x, groups=2):
  """Paper Fig. 3: "channel shuffle" of NCHW: reshape (g, C/g), transpose, flatten."""
  b, c, h, w = x.shape
  return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def depthwise(ch, stride, dilation):
  return nn.Conv2d(ch, ch, 3, stride, dilation, dilation=dilation, groups=ch, bias=False)


def pointwise(cin, cout):
  return nn.Conv2d(cin, cout, 1, bias=False)


class Unit(nn.Module):
  """Fig. 3 (c) (``spatial=False``: channel split, the right branch on half the channels)
  and (d) (the spatial down-sampling unit: two branches on the whole input)."""

  def __init__(self, cin, cout, spatial, stride, dilation):
    super().__init__()
    half = cout // 2
    self.spatial = spatial
    if spatial:
      self.branch1 = nn.Sequential(
        depthwise(cin, stride, dilation),
        nn.BatchNorm2d(cin),
        pointwise(cin, half),
        nn.BatchNorm2d(half),
        nn.ReLU(),
      )
    self.branch2 = nn.Sequential(
      pointwise(cin if spatial else half, half),
      nn.BatchNorm2d(half),
      nn.ReLU(),
      depthwise(half, stride, dilation),
      nn.BatchNorm2d(half),
      pointwise(half, half),
      nn.BatchNorm2d(half),
      nn.ReLU(),
    )

  def forward(self, x):
    if self.spatial:
      out = torch.cat([self.branch1(x), self.branch2(x)], 1)
    else:
      left, right = x.chunk(2, 1)
      out = torch.cat([left, self.branch2(right)], 1)
    return shuffle(out)


class TorchShuffleNetV2(nn.Module):
  """Returns the max pool's, stage2's, stage3's and conv5's outputs. ``strides`` and
  ``dilations`` of stage2..4: (2, 2, 2) and (1, 1, 1) is the paper's network; a dilated
  stage's first unit loses its stride and every depthwise conv of the stage is dilated."""

  def __init__(self, width=1.0, strides=(2, 2, 2), dilations=(1, 1, 1)):
    super().__init__()
    c = PAPER_WIDTHS[width]
    self.conv1 = nn.Sequential(
      nn.Conv2d(3, c[0], 3, 2, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU()
    )
    cin = c[0]
    for k, (units, cout, s, d) in enumerate(zip((4, 8, 4), c[1:4], strides, dilations)):
      stage = [Unit(cin, cout, True, s, d)] + [
        Unit(cout, cout, False, 1, d) for _ in range(units - 1)
      ]
      setattr(self, f'stage{k + 2}', nn.Sequential(*stage))
      cin = cout
    self.conv5 = nn.Sequential(pointwise(cin, c[4]), nn.BatchNorm2d(c[4]), nn.ReLU())
    self.fc = nn.Linear(c[4], 1000)

  def forward(self, x):
    x = F.max_pool2d(self.conv1(x), 3, 2, 1)
    outs = [x]
    for stage in (self.stage2, self.stage3, self.stage4):
      x = stage(x)
      outs.append(x)
    outs[-1] = self.conv5(x)
    return outs


D8 = dict(strides=(2, 1, 1), dilations=(1, 2, 4))


def reference(width, seed, **geometry):
  return randomize(TorchShuffleNetV2(width, **geometry), seed=seed)


def run_reference(ref, x):
  with torch.no_grad():
    outs = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


def image(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape + (3,)).astype(np.float32)


@nnx.jit
def backbone_outputs(backbone, x):
  return backbone(x)


def assert_features_close(got, want):
  assert len(got) == len(want) == 4
  for g, w in zip(got, want, strict=True):
    assert_logits_close(g, w)


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('width', [0.5, 1.0])
def test_widths_have_torchvisions_parameter_counts(width):
  """The backbone's parameters plus a 1000-class classifier on conv5 are torchvision's
  documented count, and so are the reference's: the widths and units are torchvision's."""
  abstract = nnx.eval_shape(lambda: ShuffleNetV2(width_mult=width, rngs=nnx.Rngs(0)))
  n_jax = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  fc = PAPER_WIDTHS[width][4] * 1000 + 1000
  assert n_jax + fc == TORCHVISION_PARAMS[width]
  assert sum(p.numel() for p in TorchShuffleNetV2(width).parameters()) == TORCHVISION_PARAMS[width]


def test_all_widths_build_abstractly():
  for width, channels in PAPER_WIDTHS.items():
    abstract = nnx.eval_shape(lambda w=width: ShuffleNetV2(width_mult=w, rngs=nnx.Rngs(0)))
    assert abstract.out_channels == channels[:3] + channels[4:]


def test_undilated_backbone_equals_the_papers_network():
  """Output stride 32: torchvision's network itself, every output."""
  ref = reference(0.5, seed=31)
  backbone = ShuffleNetV2(width_mult=0.5, output_stride=32, rngs=nnx.Rngs(0))
  state = {k: v for k, v in state_dict_numpy(ref).items() if not k.startswith('fc.')}
  load_state_dict(backbone, state, source='reference')
  backbone.eval()
  x = image((1, 70, 90))
  got = backbone_outputs(backbone, jnp.asarray(x))
  assert [g.shape[1:3] for g in got] == [(18, 23), (9, 12), (5, 6), (3, 3)]
  assert_features_close(got, run_reference(ref, x))


@pytest.fixture(scope='module')
def torchvision_file(tmp_path_factory):
  """A torchvision ``shufflenet_v2_x1_0().state_dict()``: BN step counters and ``fc.*``
  included; the weights of a reference dilated to output stride 8."""
  ref = reference(1.0, seed=32, **D8)
  path = tmp_path_factory.mktemp('shufflenet') / 'shufflenetv2_x1.pth'
  state = ref.state_dict()
  assert sum(k.endswith('num_batches_tracked') for k in state) == 56 and 'fc.weight' in state
  torch.save(state, path)
  return ref, str(path)


@pytest.fixture(scope='module')
def cli_port(torchvision_file, tmp_path_factory):
  """``python -m pspnet_jax.port FILE --out DIR --num-classes 5``: (DIR, stdout)."""
  out = tmp_path_factory.mktemp('ported') / 'x1'
  return out, run_cli(torchvision_file[1], '--out', out, '--num-classes', '5').stdout


@pytest.mark.parity
def test_torchvision_file_ports_auto_detected_with_the_dilated_features(torchvision_file, cli_port):
  """The CLI and load_torch agree, the layout is recognised by its keys alone, and the
  ported backbone's four outputs at output stride 8 are the dilated reference's."""
  ref, src = torchvision_file
  out, stdout = cli_port
  cli_model = checkpoint.load_model(out)
  cli_model.eval()
  api_model = load_torch(src, num_classes=5)[0]
  assert cli_model.config == api_model.config
  assert f'layout:  {LAYOUT} (auto-detected from stage2.0.branch1.0.weight)' in stdout
  assert 'backbone=shufflenet_v2 width_mult=1.0' in stdout
  assert 'dropped: 2 x ImageNet classifier (fc.*): fc.bias, fc.weight' in stdout
  assert 'freshly initialised' in stdout
  assert api_model.config == PSPNetConfig(num_classes=5, **RECIPE)
  state = torch.load(src)
  assert [n for n, lay in LAYOUTS.items() if lay.recognise(state)] == [LAYOUT]
  x = image((1, 70, 90), seed=1)
  want = run_reference(ref, x)
  assert [w.shape[1:3] for w in want] == [(18, 23), (9, 12), (9, 12), (9, 12)]
  for model in (cli_model, api_model):
    assert_features_close(backbone_outputs(model.backbone, jnp.asarray(x)), want)


def test_ported_backbone_initialises_training(cli_port):
  """train.py's init_checkpoint takes the ported backbone (a backbone-only port) into a
  model of the config's classes, and refuses another width in one line."""
  out, _ = cli_port
  cfg = lambda: ml_collections.ConfigDict(
    dict(init_checkpoint=str(out), init_backbone_only=False, seed=0)
  )
  model = init_checkpoint.initial_model(cfg(), PSPNetConfig(num_classes=3, **RECIPE))
  ported = checkpoint.load_model(out)
  for (p, a), (_, b) in zip(
    nnx.to_flat_state(nnx.state(model.backbone)), nnx.to_flat_state(nnx.state(ported.backbone))
  ):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))
  assert model.cls['4'].kernel.shape[-1] == 3
  with pytest.raises(
    Exception, match=r"backbone differs from config.model: \{'width_mult': \(1.0, 0.5\)"
  ):
    init_checkpoint.initial_model(cfg(), PSPNetConfig(num_classes=3, width_mult=0.5, **RECIPE))


def edited(src, path, edit):
  """The torchvision file ``src`` with ``edit(state_dict)`` applied, saved at ``path``."""
  state = torch.load(src)
  edit(state)
  torch.save(state, path)
  return path


def _set(key, value):
  return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize(
  'edit,error,match',
  [
    (
      lambda state: state.pop('stage3.0.branch1.1.running_var'),
      StateDictMismatch,
      r'missing keys \(1\):\n  stage3\.0\.branch1\.1\.running_var: model expects \(116,\)',
    ),
    (
      _set('stage4.3.branch2.5.weight', torch.zeros(232, 231, 1, 1)),
      StateDictMismatch,
      r'stage4\.3\.branch2\.5\.weight: .* has \(232, 231, 1, 1\), model expects \(232, 232, 1, 1\)',
    ),
    (
      _set('stage2.0.branch3.0.weight', torch.zeros(24, 1, 3, 3)),
      StateDictMismatch,
      r'unexpected keys \(1\):\n  stage2\.0\.branch3\.0\.weight: \(24, 1, 3, 3\)',
    ),
    (
      _set('conv5.0.weight', torch.zeros(1000, 464, 1, 1)),
      PortError,
      r'maps 464 -> 1000 channels, which is no torchvision width',
    ),
  ],
  ids=['missing', 'misshaped', 'unexpected', 'width'],
)
def test_a_wrong_key_is_refused_by_name(torchvision_file, tmp_path, edit, error, match):
  with pytest.raises(error, match=match):
    load_torch(edited(torchvision_file[1], tmp_path / 'bad.pth', edit))


def test_cli_refuses_a_missing_key_in_one_line(torchvision_file, tmp_path):
  src = edited(
    torchvision_file[1], tmp_path / 'bad.pth', lambda s: s.pop('stage3.0.branch1.1.running_var')
  )
  line = one_error_line(
    run_cli(src, '--out', tmp_path / 'o', expect_ok=False), 'stage3.0.branch1.1.running_var'
  )
  assert 'missing keys (1)' in line
  assert not (tmp_path / 'o' / 'model_config.json').exists()


def test_layout_asked_for_another_file_is_refused(torchvision_file, tmp_path):
  _, src = torchvision_file
  torch.save({'features.0.0.weight': torch.zeros(32, 3, 3, 3)}, tmp_path / 'm.pth')
  with pytest.raises(PortError, match=rf'not a {LAYOUT} checkpoint'):
    load_torch(tmp_path / 'm.pth', layout=LAYOUT)
  with pytest.raises(PortError, match='not a torchvision-mobilenet_v2 checkpoint'):
    load_torch(src, layout='torchvision-mobilenet_v2')


def test_config_refuses_a_width_torchvision_lacks():
  with pytest.raises(Exception, match=r'width_mult must be one of \[0.5, 1.0, 1.5, 2.0\]'):
    PSPNetConfig(backbone='shufflenet_v2', width_mult=0.75)
  with pytest.raises(Exception, match=r"width_mult must be one of \[1.0\] for backbone 'resnet'"):
    PSPNetConfig(width_mult=0.5)


TINY = PSPNetConfig(
  num_classes=4,
  width_mult=0.5,
  head_channels=16,
  aux_channels=8,
  ppm_channels=8,
  **{k: v for k, v in RECIPE.items() if k != 'ppm_channels'},
)


def test_pspnet_forward_and_train_step():
  """A whole PSPNet x0.5 at 64x64: eval logits at input size, and two SGD steps on one
  batch of a single class: the loss falls and every parameter group moves."""
  model = PSPNet(TINY, rngs=nnx.Rngs(0))
  x = jnp.asarray(image((2, 64, 64)))
  model.eval()
  assert model(x).shape == (2, 64, 64, 4)
  model.train()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(OptimizerConfig(learning_rate=0.05), 10)
  step = jax.jit(make_train_step(graphdef, tx, aux_weight=0.4, ignore_label=255))
  state = {
    'params': params,
    'batch_stats': batch_stats,
    'opt_state': tx.init(params),
    'step': jnp.zeros((), jnp.int32),
    'rng': jax.random.key_data(jax.random.key(0)),
  }
  batch = {'image': x, 'label': jnp.full((2, 64, 64), 1, jnp.int32)}
  new, first = step(state, batch)
  _, second = step(new, batch)
  assert np.isfinite(float(first['loss'])) and float(second['loss']) < float(first['loss'])
  for part in ('backbone', 'ppm', 'cls', 'aux'):
    before = jax.tree.leaves(state['params'][part])
    after = jax.tree.leaves(new['params'][part])
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), part
