"""Tiny PSPNets for fast tests, built without compiling an initialiser.

``checkpoint.create_model`` compiles the random initialisation, which takes ~40 s on the
shared 2-core CPU even for depth 18 / width 8; here the weights come from the PyTorch
reference's ``randomize`` (fast, with calibrated BN statistics, so activations stay well
scaled) and are copied with the strict port.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from torch_reference import TorchPSPNet, randomize, state_dict_numpy

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.port import load_state_dict

TINY = PSPNetConfig(depth=18, base_width=8, num_classes=5, head_channels=16, aux_channels=8)


def tiny_pair(config: PSPNetConfig = TINY, seed: int = 0):
  """(PyTorch reference, PSPNet) holding the same random weights."""
  model = _filled(config, lambda a: np.zeros(a.shape, a.dtype))
  ref = TorchPSPNet(
    num_classes=config.num_classes,
    depth=config.depth,
    base_width=config.base_width,
    head_channels=config.head_channels,
    aux_channels=config.aux_channels,
    align_corners=config.align_corners,
    bins=config.bins,
    dropout=config.dropout,
  )
  load_state_dict(model, state_dict_numpy(randomize(ref, seed=seed)))
  graphdef, state = nnx.split(model)
  return ref, nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def tiny_model(config: PSPNetConfig = TINY, seed: int = 0) -> PSPNet:
  return tiny_pair(config, seed)[1]


def random_model(config: PSPNetConfig, seed: int = 0) -> PSPNet:
  """A PSPNet of any config holding distinct random values (every 1-D tensor, BN variances
  among them, in 0.5 + |N(0, 1)|), for tests that move weights around rather than compute
  with them."""
  rng = np.random.default_rng(seed)
  return _filled(
    config,
    lambda a: (
      np.abs(rng.standard_normal(a.shape)) + 0.5 if a.ndim == 1 else rng.standard_normal(a.shape)
    ).astype(a.dtype),
  )


def scaled_random_model(config: PSPNetConfig, seed: int = 0) -> PSPNet:
  """A PSPNet of any config (the torch reference builds ResNets only) holding random values
  at the scales a network computes with: kernels He-normal for their fan-in, every 1-D
  tensor (BN scales, shifts and statistics) in 0.5 + 0.5 |N(0, 1)|, so that no channel is
  zero or alike (a fresh head's classifier starts at zero)."""
  rng = np.random.default_rng(seed)

  def fill(a):
    if a.ndim == 4:
      return (rng.standard_normal(a.shape) * np.sqrt(2 / np.prod(a.shape[:3]))).astype(a.dtype)
    return (0.5 + 0.5 * np.abs(rng.standard_normal(a.shape))).astype(a.dtype)

  return _filled(config, fill)


def _filled(config: PSPNetConfig, fill) -> PSPNet:
  """The model of ``config`` with each tensor ``fill(abstract array)``, without compiling."""
  graphdef, state = nnx.split(checkpoint.abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.tree.map(fill, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
