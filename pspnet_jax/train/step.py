"""The train step as pure functions: semseg's loss (cross entropy with ignored pixels, plus
the weighted auxiliary loss; ``pspnet_jax.train.loss``) and one optimiser update, with
optional gradient accumulation.

Jit it with the batch sharded over a mesh (``pspnet_jax.mesh``): BN statistics are means
over the batch axis of a sharded array, so they are the statistics of the *global* batch
(synchronised BN) whatever the number of devices or hosts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pspnet_jax.errors import UserError
from pspnet_jax.train.loss import upsampled_cross_entropy


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  *,
  aux_weight: float,
  ignore_label: int,
  grad_accum_steps: int = 1,
  lr_schedules=None,
  loss_block_rows: int = 32,
):
  """Returns ``step(state, batch) -> (state, metrics)``; ``state`` is a dict with
  ``params``, ``batch_stats``, ``opt_state``, ``step`` (int32) and ``rng`` (a key).

  With ``grad_accum_steps = k`` the global batch is split into k micro-batches whose
  gradients are summed weighted by their labelled (non-ignored) pixels, so the loss is the
  mean over the global batch's labelled pixels, as without accumulation (a plain mean of
  the micro-batches' means would weigh a pixel by how many others its micro-batch ignores).
  BN statistics are those of each micro-batch, updated in sequence, as PyTorch does when it
  accumulates.

  Both heads' losses are taken at the heads' own resolution (``upsampled_cross_entropy``,
  ``loss_block_rows`` output rows at a time): the same loss as resizing the logits to the
  label's size first, without the full-resolution float32 arrays.
  """

  if int(loss_block_rows) < 0:
    raise UserError(
      f'config.loss_block_rows={loss_block_rows}: expected output rows per block of '
      'the loss, >= 1 (or 0: the full-resolution composition)'
    )

  def loss_fn(params, batch_stats, images, labels, rng):
    # BN updates its statistics in place; NNX only allows that on Variables created at the
    # current trace level, so rebuild them here, inside value_and_grad's trace.
    batch_stats = jax.tree.map(lambda x: x, batch_stats)
    model = nnx.merge(graphdef, params, batch_stats)
    model.train()
    logits, aux = model(images, rngs=nnx.Rngs(dropout=rng), upsample=False)
    head_loss = lambda z: upsampled_cross_entropy(
      z,
      labels,
      align_corners=model.config.align_corners,
      ignore_label=ignore_label,
      block_rows=loss_block_rows,
    )
    main_loss, aux_loss = head_loss(logits), head_loss(aux)
    loss = main_loss + aux_weight * aux_loss
    return loss, (nnx.state(model, nnx.BatchStat), main_loss, aux_loss)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    images, labels = batch['image'], batch['label']
    if grad_accum_steps == 1:
      (loss, (batch_stats, main_loss, aux_loss)), grads = grad_fn(
        state['params'], state['batch_stats'], images, labels, rng
      )
    else:
      k = grad_accum_steps
      micro = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])

      def body(carry, xs):
        bs, g_acc = carry
        (l, (bs, m, a)), g = grad_fn(state['params'], bs, xs[0], xs[1], xs[2])
        n = jnp.sum(xs[1] != ignore_label).astype(jnp.float32)
        return (bs, jax.tree.map(lambda acc, g: acc + n * g, g_acc, g)), (l, m, a, n)

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      rngs = jax.random.split(rng, k)
      (batch_stats, grads), (ls, ms, as_, ns) = jax.lax.scan(
        body, (state['batch_stats'], zeros), (micro(images), micro(labels), rngs)
      )
      total = jnp.maximum(jnp.sum(ns), 1.0)
      grads = jax.tree.map(lambda g: g / total, grads)
      loss, main_loss, aux_loss = (jnp.sum(v * ns) / total for v in (ls, ms, as_))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {
      'loss': loss,
      'main_loss': main_loss,
      'aux_loss': aux_loss,
      'grad_norm': optax.global_norm(grads),
    }
    if lr_schedules is not None:
      metrics['lr'] = lr_schedules['backbone'](state['step'])
    new_state = dict(
      state, params=params, batch_stats=batch_stats, opt_state=opt_state, step=state['step'] + 1
    )
    return new_state, metrics

  return step
