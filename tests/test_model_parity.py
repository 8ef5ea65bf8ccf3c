"""PSPNet in JAX against the independent PyTorch reference (tests/torch_reference.py).

Weights are randomised in PyTorch (He-normal convs, random BN affine, BN running statistics
calibrated on images and then perturbed), copied through pspnet_jax.port.mapping (the
strict semseg-layout mapping), and both models run on the same inputs.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import TorchPSPNet, randomize, state_dict_numpy

from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.port import export_state_dict, load_state_dict

torch.set_num_threads(2)
pytestmark = pytest.mark.parity


def build_pair(seed=0, **kw):
  cfg = PSPNetConfig(**kw)
  # The reference is semseg's net: the Caffe fields (tested against tests/caffe_reference.py)
  # and the normalisation (outside the network) are not its arguments.
  caffe = (
    'stride_in_1x1',
    'ceil_mode',
    'pyramid_fixed_size',
    'mean',
    'std',
    'dtype',
    'backbone',
    'ppm_channels',
    'widths',
    'width_mult',
  )  # backbone, ppm_channels, width_mult: 1 for ResNet; widths: a pruned model's (test_prune)
  assert all(getattr(cfg, k) == getattr(PSPNetConfig(), k) for k in caffe[:3])
  ref_kw = {k: v for k, v in cfg.to_dict().items() if k not in caffe}
  ref = randomize(TorchPSPNet(**ref_kw), seed=seed)
  model = PSPNet(cfg, rngs=nnx.Rngs(seed))
  load_state_dict(model, state_dict_numpy(ref), source='reference state dict')
  return ref, model


@nnx.jit
def forward(model, x):
  return model(x)


def run_torch(ref, x):
  with torch.no_grad():
    out = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  if isinstance(out, tuple):
    return tuple(o.numpy().transpose(0, 2, 3, 1) for o in out)
  return out.numpy().transpose(0, 2, 3, 1)


def assert_logits_close(got, want, rel=1e-4):
  got = np.asarray(got)
  assert got.shape == want.shape
  scale = np.max(np.abs(want))
  err = np.max(np.abs(got - want))
  assert scale > 1e-2, 'degenerate reference output'
  assert err <= rel * scale, f'max abs error {err:.3g} > {rel} x max|logit| {scale:.3g}'
  return err / scale


VARIANTS = {
  'pspnet50_semseg': dict(depth=50, num_classes=21),
  'pspnet50_mmseg': dict(
    depth=50, num_classes=19, stem='deep32', contract_dilation=True, align_corners=False
  ),
  'resnet18_semseg': dict(depth=18, num_classes=7),
  'resnet18_torchvision_os16': dict(
    depth=18, num_classes=5, stem='torchvision', contract_dilation=True, output_stride=16
  ),
}


@pytest.mark.parametrize('name', list(VARIANTS))
def test_eval_forward_matches_torch(name):
  ref, model = build_pair(seed=1, **VARIANTS[name])
  model.eval()
  rng = np.random.default_rng(0)
  for h, w in [(65, 65), (97, 129)]:
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    assert_logits_close(forward(model, jnp.asarray(x)), run_torch(ref, x))


def test_non_multiple_input_size_matches_torch():
  """An input whose feature map (9x12) is not a multiple of bins 2/3/6: overlapping bins."""
  ref, model = build_pair(seed=2, depth=18, num_classes=4)
  model.eval()
  x = np.random.default_rng(1).standard_normal((1, 70, 90, 3)).astype(np.float32)
  assert_logits_close(forward(model, jnp.asarray(x)), run_torch(ref, x))


def test_batchnorm_train_step_matches_torch_exactly():
  """Normalisation with the biased batch variance, running variance updated with the
  unbiased one (n / (n - 1)), momentum 0.1: PyTorch's BatchNorm2d, not Flax's."""
  from pspnet_jax.models.layers import BatchNorm

  rng = np.random.default_rng(5)
  x = (rng.standard_normal((3, 5, 7, 4)) * 2 + 1).astype(np.float32)
  bn = BatchNorm(4)
  bn.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
  bn.running_mean[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
  bn.running_var[...] = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
  tbn = torch.nn.BatchNorm2d(4)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(np.asarray(bn.weight[...])))
    tbn.bias.copy_(torch.from_numpy(np.asarray(bn.bias[...])))
    tbn.running_mean.copy_(torch.from_numpy(np.asarray(bn.running_mean[...])))
    tbn.running_var.copy_(torch.from_numpy(np.asarray(bn.running_var[...])))
    want = tbn.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(bn(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(
    np.asarray(bn.running_mean[...]), tbn.running_mean.numpy(), atol=1e-6, rtol=0
  )
  np.testing.assert_allclose(
    np.asarray(bn.running_var[...]), tbn.running_var.numpy(), atol=1e-6, rtol=0
  )


def test_train_mode_forward_and_bn_update_match_torch():
  """One train-mode forward of PSPNet-50: both outputs and the running-statistics update
  of every BN layer.

  Train-mode BN divides by the standard deviation of small batches (2 x 9 x 9 values in
  layer4, 2 values in the 1x1 pyramid bin), which amplifies float32 rounding: PyTorch's own
  float32 forward differs from its float64 forward by ~1e-3 relative in the pyramid
  branches. So the reference is PyTorch in float64, and JAX float32 must be as close to it
  as PyTorch float32 is (within 2x), which is exactly "what float32 allows".
  """
  ref, model = build_pair(seed=3, depth=50, num_classes=6, dropout=0.0)
  x = np.random.default_rng(2).standard_normal((2, 65, 65, 3)).astype(np.float32)
  assert_train_mode_matches(model, ref, x)


def assert_train_mode_matches(model, ref, x, canonical=lambda state_dict: state_dict):
  """One train-mode forward of ``model`` and of ``ref`` in float32 and float64 on ``x``:
  both outputs, then every BN running statistic (``canonical`` renames the reference's
  state dict to the model's keys), JAX within 2x of PyTorch float32's distance to float64."""
  ref32 = copy.deepcopy(ref).train()
  ref64 = copy.deepcopy(ref).double().train()
  model.train()
  got = forward(model, jnp.asarray(x))
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    out32 = [o.numpy().transpose(0, 2, 3, 1) for o in ref32(xt)]
    out64 = [o.numpy().transpose(0, 2, 3, 1) for o in ref64(xt.double())]
  for g, t32, t64 in zip(got, out32, out64):
    scale = np.abs(t64).max()
    err_jax = np.abs(np.asarray(g) - t64).max() / scale
    err_torch = np.abs(t32 - t64).max() / scale
    print(f'train-mode output: JAX {err_jax:.2g}, torch float32 {err_torch:.2g} of max|logit|')
    assert err_jax <= max(2 * err_torch, 1e-5), (err_jax, err_torch)
  mine = export_state_dict(model)
  s32, s64 = canonical(state_dict_numpy(ref32)), canonical(state_dict_numpy(ref64))
  stats = [k for k in s64 if k.endswith(('running_mean', 'running_var'))]
  assert len(stats) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
  for k in stats:
    scale = np.abs(s64[k]).max()
    err_jax = np.abs(mine[k] - s64[k]).max() / scale
    err_torch = np.abs(s32[k] - s64[k]).max() / scale
    assert err_jax <= max(2 * err_torch, 1e-6), (k, err_jax, err_torch)


@pytest.mark.parametrize('depth', [50, 101])
def test_parameter_count_equals_torch(depth):
  cfg = PSPNetConfig(depth=depth, num_classes=150)
  abstract = nnx.eval_shape(lambda: PSPNet(cfg, rngs=nnx.Rngs(0)))
  n_jax = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  n_torch = sum(p.numel() for p in TorchPSPNet(num_classes=150, depth=depth).parameters())
  assert n_jax == n_torch


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  cfg = PSPNetConfig(depth=18, num_classes=3, dtype='bfloat16')
  model = PSPNet(cfg, rngs=nnx.Rngs(0))
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    assert v[...].dtype == jnp.float32
  logits, aux = nnx.jit(lambda m, x, r: m(x, rngs=r))(
    model, jnp.ones((2, 33, 33, 3)), nnx.Rngs(dropout=0)
  )
  assert logits.dtype == jnp.float32 and aux.dtype == jnp.float32
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    assert v[...].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v[...])))
