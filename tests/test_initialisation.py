"""A fresh PSPNet starts as semseg's does (hszhao/semseg at 4f274c3f): the ResNet as its
``model/resnet.py`` initialises it (every conv ``kaiming_normal_(mode='fan_out',
nonlinearity='relu')``, every BN weight 1 / bias 0), and the layers ``model/pspnet.py`` adds
(``ppm``, ``cls``, ``aux``) with PyTorch's own ``nn.Conv2d`` / ``nn.BatchNorm2d`` defaults.

The expectation is built in PyTorch the way semseg builds its model: the reference PSPNet's
modules as constructed (PyTorch's defaults), then torch's ``kaiming_normal_`` and
``constant_`` applied to the backbone's tensors. pspnet_jax's fresh tensors are compared
with those by distribution, tensor by tensor, never through a formula written here.
"""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch_reference import TorchPSPNet

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.port import export_state_dict

pytestmark = pytest.mark.parity

# Wide enough that the smallest tensor (cls.4.bias, one value per class) has 150 values;
# ResNet-18 keeps the compile of the initialiser short.
CONFIG = PSPNetConfig(depth=18, base_width=16, num_classes=150, head_channels=64, aux_channels=32)
BACKBONE = ('layer0', 'layer1', 'layer2', 'layer3', 'layer4')


def semseg_initialised(config: PSPNetConfig, seed: int = 0) -> dict:
  torch.manual_seed(seed)
  ref = TorchPSPNet(
    num_classes=config.num_classes,
    depth=config.depth,
    base_width=config.base_width,
    head_channels=config.head_channels,
    aux_channels=config.aux_channels,
  )
  for name in BACKBONE:
    for m in getattr(ref, name).modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
  return {
    k: v.detach().numpy()
    for k, v in ref.state_dict().items()
    if not k.endswith('num_batches_tracked')
  }


@pytest.fixture(scope='module')
def fresh_and_expected():
  # create_model: the initialisation train.py runs when no init_checkpoint is given.
  return export_state_dict(checkpoint.create_model(CONFIG, seed=0)), semseg_initialised(CONFIG)


def _is_conv(key, value):
  """A conv weight or a classifier's bias (every other tensor belongs to a BN)."""
  return (key.endswith('.weight') and value.ndim == 4) or key in ('cls.4.bias', 'aux.4.bias')


def test_every_layer_is_distributed_as_semseg_initialises_it(fresh_and_expected):
  """Per tensor: BN weight, bias and running statistics equal PyTorch's exactly; conv
  weights and the classifiers' biases have torch's standard deviation (to 5 standard
  errors, 5 / sqrt(n) relative), their largest |value| agrees with torch's (uniform
  layers: within 12 / n relative, the spread of the maximum of n uniform draws; normal
  layers: the same order, and beyond 2 sigma, so not a truncated normal), and a two-sample
  Kolmogorov-Smirnov test does not tell them apart (p > 1e-4). Both sides are seeded, so the
  outcome is repeatable. Head convs initialised He-normal (the old rule: 3-7x torch's std
  here), a zero bias, or a truncated normal in the backbone all fail."""
  got, want = fresh_and_expected
  assert got.keys() == want.keys()
  checked = {'conv': 0, 'bn': 0}
  for key, w in want.items():
    g = got[key]
    assert g.shape == w.shape and g.dtype == np.float32, key
    if not _is_conv(key, w):
      np.testing.assert_array_equal(g, w, err_msg=key)
      checked['bn'] += 1
      continue
    n = w.size
    g, w = g.ravel().astype(np.float64), w.ravel().astype(np.float64)
    assert abs(g.std() / w.std() - 1) <= 5 / np.sqrt(n), (key, g.std(), w.std())
    assert abs(g.mean()) <= 5 * w.std() / np.sqrt(n), (key, g.mean())
    top_g, top_w = np.abs(g).max(), np.abs(w).max()
    if key.split('.')[0] in BACKBONE:  # normal: the maximum of n draws is ~sqrt(2 ln n) sigma
      assert 0.6 < top_g / top_w < 1.6 and top_g > 2.2 * w.std(), (key, top_g, top_w)
    else:  # uniform: both maxima sit just under the same bound
      assert abs(top_g / top_w - 1) <= 12 / n, (key, top_g, top_w)
    p = stats.ks_2samp(g, w).pvalue
    assert p > 1e-4, (key, p)
    checked['conv'] += 1
  assert checked['conv'] > 20 and checked['bn'] > 20, checked


def test_backbone_pooled_is_an_untruncated_normal(fresh_and_expected):
  """Every backbone conv weight divided by its torch counterpart's std, pooled (~1M values):
  one two-sample test with the power to see what a single small layer cannot, such as a
  normal truncated at 2 sigma (4.6% of the mass moved) or a uniform of the same variance."""
  got, want = fresh_and_expected
  keys = [k for k, v in want.items() if k.split('.')[0] in BACKBONE and _is_conv(k, v)]
  scale = {k: want[k].std() for k in keys}
  pooled_g = np.concatenate([got[k].ravel() / scale[k] for k in keys])
  pooled_w = np.concatenate([want[k].ravel() / scale[k] for k in keys])
  assert pooled_g.size > 500_000
  assert stats.ks_2samp(pooled_g, pooled_w).pvalue > 1e-4
  assert np.mean(np.abs(pooled_g) > 2) == pytest.approx(np.mean(np.abs(pooled_w) > 2), abs=2e-3)
