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
  distill=None,
):
  """Returns ``step(state, batch) -> (state, metrics)``; ``state`` is a dict with
  ``params``, ``batch_stats``, ``opt_state``, ``step`` (int32) and ``rng`` (a key), and
  with ``distill`` (a ``pspnet_jax.train.distill.Distillation``) ``teacher``: the teacher's
  variables, passed through unchanged.

  With ``grad_accum_steps = k`` the global batch is split into k micro-batches whose
  gradients are summed weighted by their labelled (non-ignored) pixels, so the loss is the
  mean over the global batch's labelled pixels, as without accumulation (a plain mean of
  the micro-batches' means would weigh a pixel by how many others its micro-batch ignores).
  BN statistics are those of each micro-batch, updated in sequence, as PyTorch does when it
  accumulates.

  Both heads' losses are taken at the heads' own resolution (``upsampled_cross_entropy``,
  ``loss_block_rows`` output rows at a time): the same loss as resizing the logits to the
  label's size first, without the full-resolution float32 arrays.

  Distillation adds ``distill.term`` of the student's and the teacher's logits at the
  student's head resolution (and of the aux heads with ``distill.aux``) to the loss, and
  ``distill_loss`` to the metrics; without it the program is the one it was before. With
  accumulation the term is the mean of the micro-batches' terms (for ``cwd``, a mean over
  images, that is the global batch's term).
  """

  if int(loss_block_rows) < 0:
    raise UserError(
      f'config.loss_block_rows={loss_block_rows}: expected output rows per block of '
      'the loss, >= 1 (or 0: the full-resolution composition)'
    )

  def loss_fn(params, batch_stats, images, labels, rng, teacher=None, weights=None):
    # BN updates its statistics in place; NNX only allows that on Variables created at the
    # current trace level, so rebuild them here, inside value_and_grad's trace.
    batch_stats = jax.tree.map(lambda x: x, batch_stats)
    model = nnx.merge(graphdef, params, batch_stats)
    model.train()
    logits, aux = model(images, rngs=nnx.Rngs(dropout=rng), upsample=False)
    align_corners = model.config.align_corners
    head_loss = lambda z: upsampled_cross_entropy(
      z,
      labels,
      align_corners=align_corners,
      ignore_label=ignore_label,
      block_rows=loss_block_rows,
    )
    main_loss, aux_loss = head_loss(logits), head_loss(aux)
    loss = main_loss + aux_weight * aux_loss
    if distill is None:
      return loss, (nnx.state(model, nnx.BatchStat), main_loss, aux_loss)
    t_logits, t_aux = distill.teacher_outputs(teacher, images, logits.shape[1:3])
    kd = distill.term(logits, t_logits, labels, ignore_label, align_corners)
    if distill.aux:
      kd = kd + distill.term(aux, t_aux, labels, ignore_label, align_corners)
    # weights: (of the cross entropy, of the distillation term) in an accumulated batch.
    objective = loss + kd if weights is None else weights[0] * loss + weights[1] * kd
    return objective, (nnx.state(model, nnx.BatchStat), main_loss, aux_loss, kd)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if distill is not None:
    return _distill_step(grad_fn, tx, aux_weight, ignore_label, grad_accum_steps, lr_schedules)

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
    metrics = {'loss': loss, 'main_loss': main_loss, 'aux_loss': aux_loss}
    return _update(tx, lr_schedules, state, grads, batch_stats, metrics)

  return step


def _update(tx, lr_schedules, state, grads, batch_stats, metrics):
  """One optimiser update of ``state`` by ``grads``: ``(new_state, metrics)``, the metrics
  with the gradient's norm and (with ``lr_schedules``) the backbone's learning rate."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  if lr_schedules is not None:
    metrics['lr'] = lr_schedules['backbone'](state['step'])
  new_state = dict(
    state, params=params, batch_stats=batch_stats, opt_state=opt_state, step=state['step'] + 1
  )
  return new_state, metrics


def _distill_step(grad_fn, tx, aux_weight, ignore_label, grad_accum_steps, lr_schedules):
  """``make_train_step``'s step with a teacher (``state['teacher']``). Accumulated, each
  micro-batch's gradient is taken of its cross entropy weighted by its share of the
  labelled pixels plus its distillation term over k: the exact sum, with no micro-batch's
  term lost when it holds no labelled pixel."""

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    images, labels, teacher = batch['image'], batch['label'], state['teacher']
    k = grad_accum_steps
    if k == 1:
      (_, (batch_stats, main_loss, aux_loss, kd)), grads = grad_fn(
        state['params'], state['batch_stats'], images, labels, rng, teacher
      )
    else:
      micro = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])
      ns = jnp.sum(micro(labels) != ignore_label, axis=(1, 2, 3)).astype(jnp.float32)
      total = jnp.maximum(jnp.sum(ns), 1.0)

      def body(carry, xs):
        bs, g_acc = carry
        x, y, r, n = xs
        (_, (bs, m, a, d)), g = grad_fn(state['params'], bs, x, y, r, teacher, (n / total, 1 / k))
        return (bs, jax.tree.map(jnp.add, g_acc, g)), (m, a, d)

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      rngs = jax.random.split(rng, k)
      (batch_stats, grads), (ms, as_, ds) = jax.lax.scan(
        body, (state['batch_stats'], zeros), (micro(images), micro(labels), rngs, ns)
      )
      main_loss, aux_loss = (jnp.sum(v * ns) / total for v in (ms, as_))
      kd = jnp.mean(ds)
    metrics = {
      'loss': main_loss + aux_weight * aux_loss + kd,
      'main_loss': main_loss,
      'aux_loss': aux_loss,
      'distill_loss': kd,
    }
    return _update(tx, lr_schedules, state, grads, batch_stats, metrics)

  return step
