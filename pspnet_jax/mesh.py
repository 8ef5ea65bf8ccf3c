"""Devices and hosts: multi-process start-up, the data-parallel mesh, and placing batches
and model variables on it. Training and evaluation both use these.

One 1-D mesh over every device of every process, axis ``data``: batches are sharded on it,
parameters, BN statistics and optimiser state replicated.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
