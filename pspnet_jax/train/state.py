"""What a training run compiles, built in one place from a config: the optimizer, its
schedules, the train state and the jit-compiled step over the mesh. The training loop and
the AOT tool (``pspnet_jax.aot``) both build it here, so the program compiled ahead of time
is the program training runs (``tests/test_aot.py`` compares their StableHLO).

  trainer = create_trainer(config, graphdef, total_steps=..., ignore_label=255, mesh=mesh)
  state = trainer.initial_state(params, batch_stats, seed=config.seed)
  state, metrics = trainer.step(state, batch)   # batch sharded over the mesh's 'data' axis

With a teacher (``create_trainer(..., distill=pspnet_jax.train.distill.from_config(...))``)
the state also holds ``teacher``, its variables: replicated like the student's, passed
through the step unchanged, never saved.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pspnet_jax.train.distill import Distillation
from pspnet_jax.train.optimizer import OptimizerConfig, make_optimizer, schedules
from pspnet_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled parts of a run. ``step(state, batch) -> (state, metrics)`` donates
  ``state``; ``replicated`` / ``sharded`` are the state's and the batch's shardings."""

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  step: Callable
  replicated: NamedSharding
  sharded: NamedSharding
  distill: Distillation | None = None

  def initial_state(self, params, batch_stats, seed: int) -> dict:
    """The state at step 0: ``params``, ``batch_stats`` (nnx States), the optimizer's
    initial state, the step counter, the dropout key (``seed``) and, distilling, the
    teacher's variables."""
    state = self._student_state(params, batch_stats, seed)
    if self.distill is not None:
      state['teacher'] = self.distill.variables
    return state

  def _student_state(self, params, batch_stats, seed: int) -> dict:
    return {
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': self.tx.init(params),
      'step': jnp.zeros((), jnp.int32),
      'rng': jax.random.key_data(jax.random.key(seed)),
    }

  def abstract_state(self, params, batch_stats) -> dict:
    """``initial_state``'s shapes, dtypes and shardings, computing nothing: what the step
    is lowered for when there are no arrays (AOT compilation)."""
    state = jax.eval_shape(functools.partial(self._student_state, seed=0), params, batch_stats)
    if self.distill is not None:
      state['teacher'] = self.distill.variables
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), state
    )

  def abstract_batch(self, global_batch_size: int, crop_size: int) -> dict:
    """A global batch's shapes: float32 images [B, crop, crop, 3], int32 labels."""
    b, c = int(global_batch_size), int(crop_size)
    return {
      'image': jax.ShapeDtypeStruct((b, c, c, 3), jnp.float32, sharding=self.sharded),
      'label': jax.ShapeDtypeStruct((b, c, c), jnp.int32, sharding=self.sharded),
    }


def create_trainer(
  config,
  graphdef: nnx.GraphDef,
  *,
  total_steps: int,
  ignore_label: int,
  mesh: Mesh,
  distill: Distillation | None = None,
) -> Trainer:
  """The ``Trainer`` of ``config`` (its ``optimizer``, ``aux_weight``, ``grad_accum_steps``,
  ``loss_block_rows``) for the model ``graphdef`` over ``mesh``: parameters replicated,
  the batch sharded on ``data``, one compiled step; ``distill``: the teacher and its loss
  (``pspnet_jax.train.distill.from_config``), None without."""
  opt_config = OptimizerConfig(**dict(config.optimizer))
  tx = make_optimizer(opt_config, total_steps)
  step = make_train_step(
    graphdef,
    tx,
    aux_weight=config.aux_weight,
    ignore_label=int(ignore_label),
    grad_accum_steps=int(config.grad_accum_steps),
    lr_schedules=schedules(opt_config, total_steps),
    loss_block_rows=int(config.loss_block_rows),
    distill=distill,
  )
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  jitted = jax.jit(
    step,
    in_shardings=(replicated, sharded),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  return Trainer(graphdef, tx, jitted, replicated, sharded, distill)
