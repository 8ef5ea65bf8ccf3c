"""Training: the jit-compiled train step over a device mesh and the loop around it.

Data parallel: one ``Mesh`` over every device of every process, the batch sharded on its
``data`` axis, parameters, BN statistics and optimiser state replicated. BN statistics are
means over the batch axis of a sharded array, so under ``jax.jit`` they are the statistics
of the *global* batch (synchronised BN) whatever the number of devices or hosts.

The loop knows the checkpoint format only through ``pspnet_jax.checkpoint``, the data only
through ``pspnet_jax.data`` and evaluation only through ``pspnet_jax.evaluation``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.optimizer import OptimizerConfig, make_optimizer, schedules


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint was kept."""


# ---------------------------------------------------------------------------------------
# The step (pure functions)

def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """PyTorch ``CrossEntropyLoss(ignore_index=...)``: mean over non-ignored pixels.

  logits: [B, H, W, C] float32, labels: [B, H, W] int -> scalar float32.
  """
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, aux_weight: float,
                    ignore_label: int, grad_accum_steps: int = 1, lr_schedules=None):
  """Returns ``step(state, batch) -> (state, metrics)``; ``state`` is a dict with
  ``params``, ``batch_stats``, ``opt_state``, ``step`` (int32) and ``rng`` (a key).

  With ``grad_accum_steps = k`` the global batch is split into k micro-batches whose
  gradients are averaged (BN statistics are then those of each micro-batch, updated in
  sequence, as PyTorch does when it accumulates).
  """

  def loss_fn(params, batch_stats, images, labels, rng):
    # BN updates its statistics in place; NNX only allows that on Variables created at the
    # current trace level, so rebuild them here, inside value_and_grad's trace.
    batch_stats = jax.tree.map(lambda x: x, batch_stats)
    model = nnx.merge(graphdef, params, batch_stats)
    model.train()
    logits, aux = model(images, rngs=nnx.Rngs(dropout=rng))
    main_loss = cross_entropy(logits, labels, ignore_label)
    aux_loss = cross_entropy(aux, labels, ignore_label)
    loss = main_loss + aux_weight * aux_loss
    return loss, (nnx.state(model, nnx.BatchStat), main_loss, aux_loss)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    images, labels = batch['image'], batch['label']
    if grad_accum_steps == 1:
      (loss, (batch_stats, main_loss, aux_loss)), grads = grad_fn(
          state['params'], state['batch_stats'], images, labels, rng)
    else:
      k = grad_accum_steps
      micro = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])

      def body(carry, xs):
        bs, g_acc = carry
        (l, (bs, m, a)), g = grad_fn(state['params'], bs, xs[0], xs[1], xs[2])
        return (bs, jax.tree.map(jnp.add, g_acc, g)), (l, m, a)

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      rngs = jax.random.split(rng, k)
      (batch_stats, grads), (ls, ms, as_) = jax.lax.scan(
          body, (state['batch_stats'], zeros), (micro(images), micro(labels), rngs))
      grads = jax.tree.map(lambda g: g / k, grads)
      loss, main_loss, aux_loss = ls.mean(), ms.mean(), as_.mean()
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'main_loss': main_loss, 'aux_loss': aux_loss,
               'grad_norm': optax.global_norm(grads)}
    if lr_schedules is not None:
      metrics['lr'] = lr_schedules['backbone'](state['step'])
    new_state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                     step=state['step'] + 1)
    return new_state, metrics

  return step


# ---------------------------------------------------------------------------------------
# Devices and hosts

def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None):
  """``jax.distributed.initialize`` when launched across processes.

  Explicit arguments win; otherwise JAX's own detection (TPU pods, SLURM, Open MPI) runs
  when the environment shows a multi-process launch (``JAX_COORDINATOR_ADDRESS`` or
  ``SLURM_NTASKS`` > 1 or a TPU worker list).
  """
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif (os.environ.get('JAX_COORDINATOR_ADDRESS') or int(os.environ.get('SLURM_NTASKS', '1')) > 1
        or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')):
    jax.distributed.initialize()


def data_mesh() -> Mesh:
  """A 1-D mesh over all devices. ``Auto`` axes: XLA (GSPMD) propagates shardings through
  the step, so the batch-axis reductions (BN statistics, loss, weight gradients) become
  cross-device all-reduces without annotations in model code. (``jax.make_mesh`` defaults
  to Explicit axes in recent JAX, which would demand an ``out_sharding`` on every
  contraction over the batch.)"""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(global_batch_size: int, grad_accum_steps: int = 1):
  n = jax.device_count()
  if global_batch_size % n:
    raise ValueError(
        f'global_batch_size={global_batch_size} does not divide over {n} devices '
        f'({jax.process_count()} process(es) x {jax.local_device_count()} local): choose a '
        f'multiple of {n}, e.g. {n * max(1, round(global_batch_size / n))}')
  micro = global_batch_size // max(grad_accum_steps, 1)
  if global_batch_size % grad_accum_steps or micro % n:
    raise ValueError(
        f'global_batch_size={global_batch_size} with grad_accum_steps={grad_accum_steps} gives '
        f'micro-batches of {global_batch_size / grad_accum_steps:g}, which must be a whole '
        f'multiple of the {n} devices')


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global arrays sharded over the mesh's data axis."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


# ---------------------------------------------------------------------------------------
# The loop

class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


class _Logger:
  """metrics.jsonl and TensorBoard event files in the workdir; process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.tb = None
    if not self.enabled:
      return
    self.file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    row = {'step': step, 'kind': kind, 'time': time.time(),
           **{k: v for k, v in values.items() if isinstance(v, (int, float, str))}}
    self.file.write(json.dumps(row) + '\n')
    self.file.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f'{kind}/{k}', v, step)

  def close(self):
    if self.enabled:
      self.file.close()
      if self.tb is not None:
        self.tb.close()


def model_config_from(config, num_classes: int) -> PSPNetConfig:
  fields = dict(config.model)
  fields['num_classes'] = num_classes
  return PSPNetConfig.from_dict(fields)


def initial_model(config, model_config: PSPNetConfig) -> PSPNet:
  """A fresh model, optionally initialised from a ported checkpoint (``config.init_checkpoint``).

  A full checkpoint must have the same architecture; a backbone-only one (ImageNet
  weights) fills the backbone and leaves the new layers freshly initialised.
  """
  path = config.get('init_checkpoint') or ''
  if not path:
    return ckpt_lib.create_model(model_config, seed=config.seed)
  source = ckpt_lib.load_model(path)
  src_cfg, dst_cfg = source.config, model_config
  _, meta = ckpt_lib.read_model_config(path) if os.path.exists(
      os.path.join(path, ckpt_lib.MODEL_CONFIG)) else (None, {})
  backbone_only = bool(meta.get('backbone_only')) or src_cfg.num_classes != dst_cfg.num_classes
  arch = lambda c: {k: v for k, v in c.to_dict().items() if k not in ('num_classes', 'dtype', 'dropout')}
  if backbone_only:
    keys = ('depth', 'stem', 'base_width', 'output_stride', 'contract_dilation')
    diff = {k: (getattr(src_cfg, k), getattr(dst_cfg, k)) for k in keys
            if getattr(src_cfg, k) != getattr(dst_cfg, k)}
    if diff:
      raise ValueError(f'init_checkpoint {path}: backbone differs from config.model: {diff}')
    model = ckpt_lib.create_model(model_config, seed=config.seed)
    nnx.update(model.backbone, nnx.state(source.backbone))
    return model
  if arch(src_cfg) != arch(dst_cfg):
    raise ValueError(f'init_checkpoint {path}: architecture {arch(src_cfg)} differs from '
                     f'config.model {arch(dst_cfg)}')
  # Every variable comes from the checkpoint: fill an abstract model (no initialisation
  # compile) built from this config, so its dtype and dropout are the config's.
  model = ckpt_lib.abstract_model(model_config)
  nnx.update(model, nnx.state(source))
  return model


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

  Returns the final validation metrics (the dict written to ``workdir/eval/metrics.json``).
  """
  from pspnet_jax import data as data_lib
  from pspnet_jax import evaluation

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  if is_main:
    data_lib.prepare(ds.name, data_dir, ds.get('manual_dir') or None, **dict(ds.get('builder_kwargs', {})))
  multihost_utils.sync_global_devices('dataset prepared')
  info = data_lib.dataset_info(ds.name, data_dir)

  accum = int(config.get('grad_accum_steps', 1))
  check_batch_size(config.global_batch_size, accum)
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())

  model_config = model_config_from(config, info.num_classes)
  model = initial_model(config, model_config)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  steps_per_epoch = data_lib.steps_per_epoch(ds.name, ds.train_split, data_dir, config.global_batch_size)
  total_steps = int(config.num_steps) if config.get('num_steps') else int(config.num_epochs * steps_per_epoch)
  opt_config = OptimizerConfig(**dict(config.optimizer))
  tx = make_optimizer(opt_config, total_steps)
  lr_schedules = schedules(opt_config, total_steps)
  state = {'params': params, 'batch_stats': batch_stats, 'opt_state': tx.init(params),
           'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(jax.random.key(config.seed))}

  augment = data_lib.AugmentConfig(**dict(config.augment))
  loader = data_lib.train_loader(ds.name, ds.train_split, data_dir,
                                 global_batch_size=config.global_batch_size, augment=augment,
                                 seed=config.seed, worker_count=int(config.get('worker_count', 0)))
  ckpt = ckpt_lib.TrainCheckpointer(
      workdir, model_config, keep=int(config.get('keep_checkpoints', 3)),
      metadata={'dataset': ds.name, 'class_names': list(info.class_names),
                'palette': [list(c) for c in info.palette]})
  state = jax.device_put(state, replicated)
  start = ckpt.latest_step() or 0
  if start:
    model_vars, opt_state, meta = ckpt.restore(
        start, model_target=_abstract(_model_variables(state)),
        opt_target=_abstract(state['opt_state']), data_iterator=loader)
    params, batch_stats = _split_variables(graphdef, params, batch_stats, model_vars)
    state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                 step=jnp.asarray(meta['step'], jnp.int32))
    if is_main:
      print(f'resumed from {workdir} at step {start}', flush=True)

  train_step = jax.jit(
      make_train_step(graphdef, tx, aux_weight=config.aux_weight, ignore_label=info.ignore_label,
                      grad_accum_steps=accum, lr_schedules=lr_schedules),
      in_shardings=(replicated, NamedSharding(mesh, P('data'))),
      out_shardings=(replicated, replicated), donate_argnums=(0,))

  logger = _Logger(workdir)
  preempt = _Preemption()
  eval_cfg = evaluation.EvalConfig(**dict(config.eval))
  # During training: a short whole-image, single-scale pass (the full protocol at the end).
  quick_cfg = dataclasses.replace(eval_cfg, mode='whole', scales=(1.0,), flip=False)
  val = data_lib.eval_source(ds.name, ds.eval_split, data_dir)
  n_quick = int(config.get('eval_num_examples', 0)) or len(val)

  def validate(n, quick):
    variables = (state['params'], state['batch_stats'])
    if jax.process_count() > 1:  # every process evaluates its own (identical) replica
      variables = jax.tree.map(lambda x: x.addressable_data(0), variables)
    m = nnx.merge(graphdef, *variables)
    m.eval()
    examples = (val[i] for i in range(min(n, len(val))))
    return evaluation.evaluate(m, examples, info.num_classes, quick_cfg if quick else eval_cfg,
                               class_names=info.class_names)

  def save(step, metrics=None):
    ckpt.save(step, model_variables=_model_variables(state), opt_state=state['opt_state'],
              meta={'step': step, 'epoch': step / steps_per_epoch}, data_state=loader.get_state(),
              metrics=metrics)

  progress = _progress(is_main, start, total_steps)
  last_good = start
  t_last, step = time.perf_counter(), start
  try:
    for step in range(start + 1, total_steps + 1):
      batch = global_batch(next(loader), mesh)
      state, metrics = train_step(state, batch)
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        raise TrainingDiverged(
            f'loss is {loss} at step {step}: training stopped. The last good checkpoint '
            f'(step {last_good}) in {os.path.join(workdir, ckpt_lib.CHECKPOINTS_DIR)} was kept; '
            'lower optimizer.learning_rate or enable optimizer.clip_grad_norm and resume.')
      if step % config.log_every_steps == 0 or step == total_steps:
        now = time.perf_counter()
        row = {k: float(v) for k, v in metrics.items()}
        row['epoch'] = step / steps_per_epoch
        row['img_per_s'] = config.log_every_steps * config.global_batch_size / max(now - t_last, 1e-9)
        t_last = now
        logger.write(step, 'train', row)
        progress.update(step, row)
      eval_metrics = None
      if config.get('eval_every_steps') and step % config.eval_every_steps == 0 and step < total_steps:
        eval_metrics = validate(n_quick, quick=True)
        logger.write(step, 'val', {'miou': eval_metrics['miou'], 'macc': eval_metrics['macc'],
                                   'allacc': eval_metrics['allacc']})
        progress.note(f'step {step}: val mIoU {eval_metrics["miou"]:.4f}')
      if step < total_steps and (step % config.checkpoint_every_steps == 0 or eval_metrics is not None):
        save(step, {'miou': eval_metrics['miou']} if eval_metrics else None)
        last_good = step
      _maybe_inject_signal(step)
      if preempt.any_process():
        save(step)
        ckpt.wait()
        progress.note(f'SIGTERM: saved step {step} in {workdir}; exiting')
        return {}
  finally:
    progress.close()
    preempt.restore()
  final = validate(len(val), quick=False)
  if start < total_steps:  # a finished run that is started again only re-evaluates
    save(total_steps, {'miou': final['miou']})
  ckpt.wait()
  ckpt.close()
  logger.write(total_steps, 'val', {'miou': final['miou'], 'macc': final['macc'],
                                    'allacc': final['allacc']})
  logger.close()
  if is_main:
    from pspnet_jax.eval_outputs import write_eval_outputs
    write_eval_outputs(os.path.join(workdir, 'eval'), final, eval_config=eval_cfg)
  return final


def _maybe_inject_signal(step: int):
  """Fault injection for tests: ``PSPNET_SIGNAL_AT_STEP=7:KILL`` (or ``:TERM``) sends
  that signal to this process right after step 7, wherever the asynchronous checkpoint
  writer is. Tests use it because an outside signal races a fast machine."""
  spec = os.environ.get('PSPNET_SIGNAL_AT_STEP')
  if spec:
    at, name = spec.split(':')
    if step == int(at):
      os.kill(os.getpid(), getattr(signal, 'SIG' + name))


def _model_variables(state) -> dict:
  return nnx.to_pure_dict(nnx.merge_state(state['params'], state['batch_stats']))


def _split_variables(graphdef, params, batch_stats, variables: dict):
  """Pure dict of params + BN stats -> (params, batch_stats) States shaped like the given."""
  full = nnx.merge_state(params, batch_stats)
  nnx.replace_by_pure_dict(full, variables)
  _, params, batch_stats = nnx.split(nnx.merge(graphdef, full), nnx.Param, nnx.BatchStat)
  return params, batch_stats


def _abstract(tree):
  """Restore targets with the shardings of ``tree``'s arrays: a checkpoint written on one
  topology (devices, hosts) restores onto the current one."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class _progress:
  """A tqdm bar on process 0 with step, epoch, loss, aux loss, lr, img/s and ETA."""

  def __init__(self, enabled: bool, start: int, total: int):
    self.bar = None
    self.last = start
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                      file=sys.stdout, mininterval=1.0)

  def update(self, step: int, row: dict):
    if self.bar is None:
      return
    self.bar.update(step - self.last)
    self.last = step
    self.bar.set_postfix_str(
        f"ep {row['epoch']:.2f} loss {row['loss']:.4f} aux {row['aux_loss']:.4f} "
        f"lr {row.get('lr', float('nan')):.2e} {row['img_per_s']:.1f} img/s")

  def note(self, text: str):
    if self.bar is not None:
      self.bar.write(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()
