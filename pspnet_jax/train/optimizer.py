"""The semseg optimisation recipe in optax: SGD with coupled weight decay, poly decay
stepped per iteration, 10x learning rate on the new layers.

PyTorch's SGD adds ``weight_decay * p`` to the gradient *before* momentum
(``buf = momentum * buf + g + wd * p``; ``p -= lr * buf``): that is
``add_decayed_weights`` followed by ``sgd(momentum)`` in optax, not AdamW-style decoupled
decay. semseg sets the learning rate of iteration ``k`` (0-based) to
``base_lr * (1 - k / max_iter) ** power`` for the backbone and 10x that for ``ppm``,
``cls`` and ``aux``.

``bn_l1`` is network slimming's sparsity (Liu et al., ICCV 2017): ``bn_l1 * sum |gamma|``
over the BN scales that ``pspnet_jax.prune`` prunes by default (``prune.slimming_mask``),
added as its subgradient ``bn_l1 * sign(gamma)`` to the gradient before clipping, decay and
momentum: the update of that term in the loss, which the logged loss leaves out (as the
authors' code adds it to the gradients after backward).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from pspnet_jax.errors import UserError

HEAD_MODULES = ('ppm', 'cls', 'aux')  # semseg's "new layers": 10x learning rate


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = 'sgd'  # 'sgd' (semseg) | 'adamw'
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  power: float = 0.9  # poly schedule exponent
  warmup_steps: int = 0  # linear warmup from 0, then poly decay
  head_lr_multiplier: float = 10.0
  clip_grad_norm: float = 0.0  # 0: no clipping
  b1: float = 0.9  # adamw only
  b2: float = 0.999
  bn_l1: float = 0.0  # network slimming's lambda on the prunable BNs' |gamma|; 0: off


def poly_schedule(
  base_lr: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0
) -> optax.Schedule:
  """lr(k) = base_lr * (1 - k / total_steps) ** power, after an optional linear warmup."""
  if total_steps <= 0:
    raise UserError(f'total_steps must be positive, got {total_steps}')
  poly = optax.polynomial_schedule(
    init_value=base_lr, end_value=0.0, power=power, transition_steps=total_steps
  )
  if warmup_steps <= 0:
    return poly
  warm = optax.linear_schedule(
    0.0, base_lr * (1 - warmup_steps / total_steps) ** power, warmup_steps
  )
  return optax.join_schedules([warm, lambda k: poly(k + warmup_steps)], [warmup_steps])


def param_group(path) -> str:
  """'head' for the pyramid pooling and both heads, 'backbone' otherwise."""
  first = path[0]
  key = getattr(first, 'key', getattr(first, 'name', first))
  return 'head' if str(key) in HEAD_MODULES else 'backbone'


def param_groups(params):
  return jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)


def schedules(config: OptimizerConfig, total_steps: int) -> dict[str, optax.Schedule]:
  base = poly_schedule(config.learning_rate, total_steps, config.power, config.warmup_steps)
  mult = config.head_lr_multiplier
  return {'backbone': base, 'head': lambda k: mult * base(k)}


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The full transformation; ``params`` passed to ``init``/``update`` are grouped by
  ``param_groups``."""

  def group_tx(schedule):
    if config.name == 'sgd':
      return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum or None),
      )
    if config.name == 'adamw':
      return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    raise UserError(f"optimizer.name must be 'sgd' or 'adamw', got {config.name!r}")

  tx = optax.multi_transform(
    {g: group_tx(s) for g, s in schedules(config, total_steps).items()}, param_groups
  )
  if config.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  if config.bn_l1 > 0:
    from pspnet_jax.prune import slimming_mask  # the pruning module owns which BNs

    tx = optax.chain(optax.masked(add_l1_subgradient(config.bn_l1), slimming_mask), tx)
  return tx


def add_l1_subgradient(strength: float) -> optax.GradientTransformation:
  """Adds ``strength * sign(p)``, the (sub)gradient of ``strength * |p|``, to the updates."""

  def update(updates, state, params):
    return jax.tree.map(lambda g, p: g + strength * jnp.sign(p), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
