"""The training loop: data -> jit-compiled step over the mesh -> logs, validation,
checkpoints, interruption (SIGTERM, Ctrl-C); resumes exactly from the workdir's latest checkpoint.

The loop knows the checkpoint format only through ``pspnet_jax.checkpoint``, the data only
through ``pspnet_jax.data`` and evaluation only through ``pspnet_jax.evaluation``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax import config_file, output_dir
from pspnet_jax import data as data_lib
from pspnet_jax import evaluation
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.train.init_checkpoint import initial_model, model_config_from
from pspnet_jax.train.monitor import DivergenceWatch, MetricsLogger, ProgressBar
from pspnet_jax.train.optimizer import OptimizerConfig, make_optimizer, schedules
from pspnet_jax.train.signals import StopRequest, maybe_inject_signal
from pspnet_jax.train.workdir import WorkdirLock
from pspnet_jax.train.step import make_train_step


class TrainingInterrupted(Exception):
  """Ctrl-C (SIGINT): the loop saved the current step and stopped; the message says where."""


class TrainingDiverged(FloatingPointError):
  """The loss or gradient became NaN or inf, or the loss spiked (``DivergenceWatch``); the
  checkpoints from before it were kept, the later ones set aside."""


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

  Returns the final validation metrics (the dict written to ``workdir/eval/metrics.json``).
  """
  config_file.check_values(config)
  workdir = os.path.abspath(workdir)
  output_dir.check_writable(workdir, '--workdir')
  is_main = jax.process_index() == 0
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  if is_main:
    data_lib.prepare(ds.name, data_dir, ds.get('manual_dir') or None, **dict(ds.get('builder_kwargs', {})))
  multihost_utils.sync_global_devices('dataset prepared')
  info = data_lib.dataset_info(ds.name, data_dir)

  accum = int(config.get('grad_accum_steps', 1))
  mesh_lib.check_batch_size(config.global_batch_size, accum)
  mesh = mesh_lib.data_mesh()

  model_config = model_config_from(config, info.num_classes)
  eval_cfg = evaluation.EvalConfig.from_config(config.eval, info.ignore_label)
  ckpt_lib.check_workdir(workdir, model_config)  # refusals come before anything is written
  with WorkdirLock(workdir):
    return _train(config, workdir, info, model_config, eval_cfg, mesh)


def _train(config, workdir: str, info, model_config, eval_cfg, mesh) -> dict:
  """``train_and_evaluate`` once its checks passed, in the workdir it holds."""
  is_main = jax.process_index() == 0
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  accum = int(config.get('grad_accum_steps', 1))
  replicated = NamedSharding(mesh, P())
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
                                 seed=config.seed, worker_count=int(config.get('worker_count', 0)),
                                 mean=model_config.mean, std=model_config.std)
  ckpt = ckpt_lib.TrainCheckpointer(
      workdir, model_config, keep=int(config.get('keep_checkpoints', 3)),
      metadata={'dataset': ds.name, 'class_names': list(info.class_names),
                'palette': [list(c) for c in info.palette]})
  state = jax.device_put(state, replicated)
  restored = ckpt.restore_newest_intact(
      model_target=_abstract(_model_variables(state)), opt_target=_abstract(state['opt_state']))
  start = restored[0] if restored else 0
  if start:
    _, model_vars, opt_state, meta, data_state = restored
    params, batch_stats = _split_variables(graphdef, params, batch_stats, model_vars)
    state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                 step=jnp.asarray(meta['step'], jnp.int32))
    note = loader.resume(data_state, ds.get('resume_data', 'auto'))
    if is_main:
      print(f'resumed from {workdir} at step {start}', flush=True)
      if note:
        print(f'note: {note}', flush=True)

  train_step = jax.jit(
      make_train_step(graphdef, tx, aux_weight=config.aux_weight, ignore_label=info.ignore_label,
                      grad_accum_steps=accum, lr_schedules=lr_schedules,
                      loss_block_rows=int(config.loss_block_rows)),
      in_shardings=(replicated, NamedSharding(mesh, P('data'))),
      out_shardings=(replicated, replicated), donate_argnums=(0,))

  logger = MetricsLogger(workdir)
  stop = StopRequest(workdir)
  # During training: a short whole-image, single-scale pass (the full protocol at the end).
  quick_cfg = dataclasses.replace(eval_cfg, mode='whole', scales=(1.0,), flip=False, per_scale=False)
  val = data_lib.eval_source(ds.name, ds.eval_split, data_dir)
  n_quick = int(config.get('eval_num_examples', 0)) or len(val)

  def validate(n, quick):
    """Every process evaluates its share of the first ``n`` images on its local devices."""
    m = nnx.merge(graphdef, state['params'], state['batch_stats'])
    m.eval()
    return evaluation.evaluate(m, val, info.num_classes, quick_cfg if quick else eval_cfg,
                               class_names=info.class_names, num_examples=n)

  def save(step, metrics=None):
    check_finite()  # a checkpoint never holds a step after a non-finite one
    ckpt.save(step, model_variables=_model_variables(state), opt_state=state['opt_state'],
              meta={'step': step, 'epoch': loader.step / steps_per_epoch}, data_state=loader.get_state(),
              metrics=metrics)

  # Step metrics stay on the device until a log, validation or save step reads them all at
  # once: reading them every step would stall the host until each step finished.
  pending = []

  watch = DivergenceWatch(config.get('divergence_factor', 10.0), info.num_classes)

  def check_finite() -> dict | None:
    """Reads the pending metrics; returns the last step's as floats. TrainingDiverged at
    the first step where the run diverged (``DivergenceWatch``)."""
    rows = jax.device_get(pending)
    pending.clear()
    for at, row in rows:
      problem = watch.check(at, row)
      if problem:
        diverged(at, problem)
    return {k: float(v) for k, v in rows[-1][1].items()} if rows else None

  def diverged(at: int, problem: str):
    """The loss of step ``at`` comes from the weights of step ``at - 1``: checkpoints from
    that step on are set aside, so that the advice below, followed, resumes before it."""
    moved = ckpt.set_aside_diverged(at - 1)
    kept = ckpt.latest_step()
    aside = (f' Checkpoint(s) of step(s) {", ".join(map(str, moved))}, written after it began, were '
             f'moved to <step>{ckpt_lib.DIVERGED_SUFFIX} in {ckpt.directory}.' if moved else '')
    resume = (f'resumes from step {kept}, the last checkpoint from before it' if kept else
              'starts afresh, no checkpoint being from before it')
    raise TrainingDiverged(
        f'{problem}: training stopped.{aside} Run again with a lower --config.optimizer.'
        f'learning_rate (or with --config.optimizer.clip_grad_norm set): the run {resume}.')

  progress = ProgressBar(is_main, start, total_steps)
  t_last, step = time.perf_counter(), start
  try:
    for step in range(start + 1, total_steps + 1):
      batch = mesh_lib.global_batch(next(loader), mesh)
      state, metrics = train_step(state, batch)
      pending.append((step, metrics))
      log_step = step % config.log_every_steps == 0 or step == total_steps
      if log_step:
        row = check_finite()
        now = time.perf_counter()
        row['epoch'] = loader.step / steps_per_epoch
        row['img_per_s'] = config.log_every_steps * config.global_batch_size / max(now - t_last, 1e-9)
        t_last = now
        logger.write(step, 'train', row)
        progress.update(step, row)
      eval_metrics = None
      if config.get('eval_every_steps') and step % config.eval_every_steps == 0 and step < total_steps:
        check_finite()
        eval_metrics = validate(n_quick, quick=True)
        logger.write(step, 'val', {'miou': eval_metrics['miou'], 'macc': eval_metrics['macc'],
                                   'allacc': eval_metrics['allacc']})
        progress.note(f'step {step}: val mIoU {eval_metrics["miou"]:.4f}')
      if step < total_steps and (step % config.checkpoint_every_steps == 0 or eval_metrics is not None):
        save(step, {'miou': eval_metrics['miou']} if eval_metrics else None)
      maybe_inject_signal(step)
      # Asking the other processes is a collective: only on log steps in a multi-process run.
      if (jax.process_count() == 1 or log_step) and stop.any_process():
        if ckpt.latest_step() != step:
          save(step)
        ckpt.wait()
        if stop.requested == 'SIGINT':
          raise TrainingInterrupted(f'interrupted: saved step {step} in {workdir}; run the same '
                                    'command to resume from it')
        progress.note(f'{stop.requested or "stop"}: saved step {step} in {workdir}; exiting')
        return {}
    check_finite()
  except TrainingDiverged:
    ckpt.wait()  # the last good checkpoint may still be being written: finish it
    raise
  finally:
    progress.close()
    stop.restore()
  final = validate(len(val), quick=False)
  if start < total_steps:  # a finished run that is started again only re-evaluates
    # "Best" ranks steps by the in-training validation, so the last step is scored by the
    # same protocol on the same examples, not by the full protocol above.
    quick = validate(n_quick, quick=True) if config.get('eval_every_steps') else None
    if quick is not None:
      logger.write(total_steps, 'val', {'miou': quick['miou'], 'macc': quick['macc'],
                                        'allacc': quick['allacc']})
    save(total_steps, {'miou': quick['miou']} if quick else None)
  ckpt.wait()
  ckpt.close()
  logger.write(total_steps, 'eval', {'miou': final['miou'], 'macc': final['macc'],
                                     'allacc': final['allacc']})
  logger.close()
  if is_main:
    evaluation.write_eval_outputs(os.path.join(workdir, 'eval'), final, eval_config=eval_cfg)
  return final


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
