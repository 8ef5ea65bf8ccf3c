"""Devices and hosts: multi-process start-up, the data-parallel meshes, and placing batches
and model variables on them. Training and evaluation both use these.

Training: one 1-D mesh over every device of every process (``data_mesh``), axis ``data``:
batches are sharded on it; parameters, BN statistics and optimiser state replicated.
Evaluation: each process evaluates its own images on a mesh of its *local* devices
(``local_mesh``), with the model replicated there (``replicate``), and the processes sum
their confusion matrices (``sum_over_processes``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pspnet_jax.errors import UserError


def maybe_initialize_distributed(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
):
  """``jax.distributed.initialize`` when launched across processes.

  Explicit arguments win; otherwise JAX's own detection (TPU pods, SLURM, Open MPI) runs
  when the environment shows a multi-process launch (``JAX_COORDINATOR_ADDRESS`` or
  ``SLURM_NTASKS`` > 1 or a TPU worker list).
  """
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
  elif (
    os.environ.get('JAX_COORDINATOR_ADDRESS')
    or int(os.environ.get('SLURM_NTASKS', '1')) > 1
    or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
  ):
    jax.distributed.initialize()


def mesh_over(devices) -> Mesh:
  """A 1-D mesh (axis ``data``, ``Auto``) over ``devices``, e.g. a TPU slice's compile-only
  devices for ahead-of-time compilation."""
  return Mesh(np.asarray(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def data_mesh() -> Mesh:
  """A 1-D mesh over all devices. ``Auto`` axes: XLA (GSPMD) propagates shardings through
  the step, so the batch-axis reductions (BN statistics, loss, weight gradients) become
  cross-device all-reduces without annotations in model code. (``jax.make_mesh`` defaults
  to Explicit axes in recent JAX, which would demand an ``out_sharding`` on every
  contraction over the batch.)"""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh() -> Mesh:
  """A 1-D mesh (axis ``data``, ``Auto``) over this process's own devices."""
  return mesh_over(jax.local_devices())


def replicate(tree, mesh: Mesh):
  """Every array of ``tree`` replicated over ``mesh``, wherever it lives now: on one device
  (a loaded or ported model), on another mesh, or as a global array of a multi-process run
  (whose local replica is taken, so it must be replicated there). Abstract arrays
  (``jax.ShapeDtypeStruct``) get the replicated sharding."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.ShapeDtypeStruct):  # an abstract model, for ahead-of-time lowering
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def per_process(value: int) -> np.ndarray:
  """[process count] the int32 ``value`` each process passes (a collective when there are
  several processes): how they agree on one outcome."""
  if jax.process_count() == 1:
    return np.asarray([value], np.int32)
  from jax.experimental import multihost_utils

  return np.ravel(np.asarray(multihost_utils.process_allgather(np.int32(value))))


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
  """Exact sum of a non-negative int64 array over all processes (each passes its own).

  Sent as two uint32 words per value: JAX without ``jax_enable_x64`` would truncate int64."""
  counts = np.asarray(counts, np.int64)
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils

  words = np.stack([counts & 0xFFFFFFFF, counts >> 32]).astype(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words)).astype(np.int64)
  return (gathered[:, 0] + (gathered[:, 1] << 32)).sum(axis=0)


def check_batch_size(global_batch_size: int, grad_accum_steps: int = 1, devices=None):
  """The global batch (and each micro-batch) must split evenly over ``devices`` (default:
  every device of the run; ``pspnet_jax.aot`` passes a TPU slice's)."""
  n = jax.device_count() if devices is None else len(devices)
  where = (
    f'{jax.process_count()} process(es) x {jax.local_device_count()} local'
    if devices is None
    else f'the target has {n}'
  )
  if global_batch_size % n:
    raise UserError(
      f'global_batch_size={global_batch_size} does not divide over {n} devices '
      f'({where}): choose a multiple of {n}, e.g. {n * max(1, round(global_batch_size / n))}'
    )
  micro = global_batch_size // max(grad_accum_steps, 1)
  if global_batch_size % grad_accum_steps or micro % n:
    raise UserError(
      f'global_batch_size={global_batch_size} with grad_accum_steps={grad_accum_steps} gives '
      f'micro-batches of {global_batch_size / grad_accum_steps:g}, which must be a whole '
      f'multiple of the {n} devices'
    )


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global arrays sharded over the mesh's data axis."""
  sharding = NamedSharding(mesh, P('data'))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }
