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

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax import config_file, evaluation, ops, output_dir
from pspnet_jax import data as data_lib
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.train import distill
from pspnet_jax.train.init_checkpoint import initial_model, model_config_from
from pspnet_jax.train.monitor import DivergenceWatch, MetricsLogger, ProgressBar
from pspnet_jax.train.signals import StopRequest
from pspnet_jax.train.state import create_trainer
from pspnet_jax.train.workdir import WorkdirLock, record_config

# Called with the step number after each step: where tests inject faults (a signal at a
# chosen step, tests/scripts/train_with_signal.py), as an outside signal races a fast machine.
AFTER_STEP_HOOKS = []


class TrainingInterrupted(Exception):
  """Ctrl-C (SIGINT): the loop saved the current step and stopped; the message says where."""


class TrainingDiverged(FloatingPointError):
  """The loss or gradient became NaN or inf, or the loss spiked (``DivergenceWatch``); the
  checkpoints from before it were kept, the later ones set aside."""


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

  Returns the final validation metrics (the dict written to ``workdir/eval/metrics.json``);
  ``{}`` when a SIGTERM stopped the run (it saved first).
  """
  config_file.check_values(config)
  conv = ops.configure_conv(**dict(config.conv))  # for every program this run traces
  workdir = os.path.abspath(workdir)
  output_dir.check_writable(workdir, '--workdir')
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  if jax.process_index() == 0:
    data_lib.prepare(ds.name, data_dir, ds.manual_dir or None, **dict(ds.builder_kwargs))
  multihost_utils.sync_global_devices('dataset prepared')
  info = data_lib.dataset_info(ds.name, data_dir)
  mesh_lib.check_batch_size(config.global_batch_size, int(config.grad_accum_steps))
  model_config = model_config_from(config, info.num_classes)
  eval_cfg = evaluation.EvalConfig.from_config(config.eval, info.ignore_label)
  ckpt_lib.check_workdir(workdir, model_config)  # refusals come before anything is written
  with WorkdirLock(workdir):
    run = _Run(config, workdir, data_dir, info, model_config, eval_cfg)
    record_config(workdir, config, conv)  # after the run's refusals
    try:
      return run.finish() if run.train() else {}  # {}: stopped by SIGTERM, after saving
    finally:
      run.logger.close()  # on every path: the events written so far reach the disk


class _Run:
  """One run in a workdir it holds: its parts (``trainer``, ``loader``, ``ckpt``...) are
  attributes, the train state the only thing that changes, step by step."""

  def __init__(self, config, workdir, data_dir, info, model_config, eval_cfg):
    self.config, self.workdir, self.info, self.eval_cfg = config, workdir, info, eval_cfg
    self.is_main = jax.process_index() == 0
    ds = config.dataset
    self.mesh = mesh_lib.data_mesh()
    self.steps_per_epoch = data_lib.steps_per_epoch(
      ds.name, ds.train_split, data_dir, config.global_batch_size
    )
    self.total_steps = (
      int(config.num_steps) if config.num_steps else int(config.num_epochs * self.steps_per_epoch)
    )
    self.ckpt = ckpt_lib.TrainCheckpointer(
      workdir,
      model_config,
      keep=int(config.keep_checkpoints),
      metadata={
        'dataset': ds.name,
        'class_names': list(info.class_names),
        'palette': [list(c) for c in info.palette],
      },
    )
    # The teacher's refusals (classes, another teacher than the workdir's) before any compile.
    distillation = distill.from_config(config, model_config)  # None without a teacher
    distill.check_teacher(workdir, distillation, resuming=self.ckpt.latest_step() is not None)
    model = initial_model(config, model_config)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.trainer = create_trainer(
      config,
      graphdef,
      total_steps=self.total_steps,
      ignore_label=info.ignore_label,
      mesh=self.mesh,
      distill=distillation,
    )
    self.state = jax.device_put(
      self.trainer.initial_state(params, batch_stats, config.seed), self.trainer.replicated
    )
    self.loader = data_lib.train_loader(
      ds.name,
      ds.train_split,
      data_dir,
      global_batch_size=config.global_batch_size,
      augment=data_lib.AugmentConfig(**dict(config.augment)),
      seed=config.seed,
      worker_count=int(config.worker_count),
      mean=model_config.mean,
      std=model_config.std,
    )
    self.val = data_lib.eval_source(ds.name, ds.eval_split, data_dir)
    self.n_quick = int(config.eval_num_examples) or len(self.val)
    # During training: a short whole-image, single-scale pass (the full protocol at the end).
    self.quick_cfg = dataclasses.replace(
      eval_cfg, mode='whole', scales=(1.0,), flip=False, per_scale=False
    )
    self.watch = DivergenceWatch(config.divergence_factor, info.num_classes)
    # Step metrics stay on the device until a log, validation or save step reads them all
    # at once: reading them every step would stall the host until each step finished.
    self.pending = []
    self.start = self.restore()  # before anything else is written: it may refuse
    self.logger = MetricsLogger(workdir)

  def restore(self) -> int:
    """Resumes from the newest intact checkpoint; returns its step (0 without one)."""
    params, batch_stats = self.state['params'], self.state['batch_stats']
    restored = self.ckpt.restore_newest_intact(
      model_target=_abstract(_model_variables(self.state)),
      opt_target=_abstract(self.state['opt_state']),
    )
    if not restored:
      return 0
    start, model_vars, opt_state, meta, data_state = restored
    params, batch_stats = _split_variables(self.trainer.graphdef, params, batch_stats, model_vars)
    self.state = dict(
      self.state,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      step=jnp.asarray(meta['step'], jnp.int32),
    )
    note = self.loader.resume(data_state, self.config.dataset.resume_data)
    if self.is_main:
      print(f'resumed from {self.workdir} at step {start}', flush=True)
      if note:
        print(f'note: {note}', flush=True)
    return start

  def train(self) -> bool:
    """The steps from ``start`` to the end; False when a SIGTERM stopped them (saved)."""
    config, total = self.config, self.total_steps
    stop = StopRequest(self.workdir)
    progress = ProgressBar(self.is_main, self.start, total)
    t_last = time.perf_counter()
    try:
      for step in range(self.start + 1, total + 1):
        batch = mesh_lib.global_batch(next(self.loader), self.mesh)
        self.state, metrics = self.trainer.step(self.state, batch)
        self.pending.append((step, metrics))
        log_step = step % config.log_every_steps == 0 or step == total
        if log_step:
          row = self.check()
          now = time.perf_counter()
          row['epoch'] = self.loader.step / self.steps_per_epoch
          row['img_per_s'] = (
            config.log_every_steps * config.global_batch_size / max(now - t_last, 1e-9)
          )
          t_last = now
          self.logger.write(step, 'train', row)
          progress.update(step, row)
        val = None
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total:
          val = self.validate_quick(step)
          progress.note(f'step {step}: val mIoU {val["miou"]:.4f}')
        if step < total and (step % config.checkpoint_every_steps == 0 or val is not None):
          self.save(step, val)
        for hook in AFTER_STEP_HOOKS:
          hook(step)
        # Asking the other processes is a collective: only on log steps when there are several.
        if (jax.process_count() == 1 or log_step) and stop.any_process():
          self.stop(step, stop.requested, progress)
          return False
      self.check()
      return True
    except TrainingDiverged:
      self.ckpt.wait()  # the last good checkpoint may still be being written: finish it
      raise
    finally:
      progress.close()
      stop.restore()

  def stop(self, step: int, signal_name: str, progress):
    """Saves ``step`` and stops: SIGINT raises ``TrainingInterrupted``, SIGTERM returns."""
    if self.ckpt.latest_step() != step:
      self.save(step)
    self.ckpt.wait()
    if signal_name == 'SIGINT':
      raise TrainingInterrupted(
        f'interrupted: saved step {step} in {self.workdir}; run the same command to resume from it'
      )
    progress.note(f'{signal_name}: saved step {step} in {self.workdir}; exiting')

  def finish(self) -> dict:
    """The last checkpoint, then the full protocol on the validation split and eval/."""
    total = self.total_steps
    if self.start < total:  # a finished run that is started again only re-evaluates
      # "Best" ranks steps by the in-training validation, so the last step is scored by
      # the same protocol on the same examples, not by the full protocol below. Saved
      # first: an interrupted final evaluation loses no training.
      quick = self.validate_quick(total) if self.config.eval_every_steps else None
      self.save(total, quick)
    self.ckpt.wait()
    self.ckpt.close()
    final = self.validate(self.eval_cfg, len(self.val))
    self.logger.write(total, 'eval', _scores(final))
    if self.is_main:
      evaluation.write_eval_outputs(
        os.path.join(self.workdir, 'eval'), final, eval_config=self.eval_cfg
      )
    return final

  def validate(self, eval_cfg, n: int) -> dict:
    """Every process evaluates its share of the first ``n`` images on its local devices."""
    model = nnx.merge(self.trainer.graphdef, self.state['params'], self.state['batch_stats'])
    model.eval()
    return evaluation.evaluate(
      model,
      self.val,
      self.info.num_classes,
      eval_cfg,
      class_names=self.info.class_names,
      num_examples=n,
    )

  def validate_quick(self, step: int) -> dict:
    self.check()
    metrics = self.validate(self.quick_cfg, self.n_quick)
    self.logger.write(step, 'val', _scores(metrics))
    return metrics

  def save(self, step: int, val: dict | None = None):
    self.check()  # a checkpoint never holds a step from after a divergence
    self.ckpt.save(
      step,
      model_variables=_model_variables(self.state),
      opt_state=self.state['opt_state'],
      meta={'step': step, 'epoch': self.loader.step / self.steps_per_epoch},
      data_state=self.loader.get_state(),
      metrics={'miou': val['miou']} if val else None,
    )

  def check(self) -> dict | None:
    """Reads the pending metrics; returns the last step's as floats. ``TrainingDiverged``
    at the first step where the run diverged (``DivergenceWatch``)."""
    rows = jax.device_get(self.pending)
    self.pending.clear()
    for at, row in rows:
      problem = self.watch.check(at, row)
      if problem:
        self.diverged(at, problem)
    return {k: float(v) for k, v in rows[-1][1].items()} if rows else None

  def diverged(self, at: int, problem: str):
    """The loss of step ``at`` comes from the weights of step ``at - 1``: checkpoints from
    that step on are set aside, so that the advice below, followed, resumes before it."""
    moved = self.ckpt.set_aside_diverged(at - 1)
    kept = self.ckpt.latest_step()
    aside = (
      f' Checkpoint(s) of step(s) {", ".join(map(str, moved))}, written after it began, were '
      f'moved to <step>{ckpt_lib.DIVERGED_SUFFIX} in {self.ckpt.directory}.'
      if moved
      else ''
    )
    resume = (
      f'resumes from step {kept}, the last checkpoint from before it'
      if kept
      else 'starts afresh, no checkpoint being from before it'
    )
    raise TrainingDiverged(
      f'{problem}: training stopped.{aside} Run again with a lower --config.optimizer.'
      f'learning_rate (or with --config.optimizer.clip_grad_norm set): the run {resume}.'
    )


def _scores(metrics: dict) -> dict:
  return {k: metrics[k] for k in ('miou', 'macc', 'allacc')}


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
