"""Multi-host start-up (``mesh.maybe_initialize_distributed``) from a faked launch
environment: which environments start ``jax.distributed`` and with what, without launching
anything (``jax.distributed.initialize`` is replaced by a recorder)."""

import jax
import pytest

from pspnet_jax import mesh

LAUNCH_VARIABLES = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_COORDINATOR_PORT',
  'TPU_WORKER_HOSTNAMES',
  'TPU_PROCESS_ADDRESSES',
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)
# What srun exports to task 2 of 4 (two nodes, two tasks each), job 4242.
SLURM_TASK = {
  'SLURM_JOB_ID': '4242',
  'SLURM_STEP_NODELIST': 'gpu[007-008]',
  'SLURM_NTASKS': '4',
  'SLURM_PROCID': '2',
  'SLURM_LOCALID': '0',
}


@pytest.fixture
def launch(monkeypatch):
  """Returns ``start(env, *args) -> list of the calls to jax.distributed.initialize``."""

  def start(env, *args):
    for name in LAUNCH_VARIABLES:
      monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
      monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
    mesh.maybe_initialize_distributed(*args)
    return calls

  return start


@pytest.mark.parametrize(
  'env',
  [{}, dict(SLURM_TASK, SLURM_NTASKS='1', SLURM_PROCID='0'), {'TPU_WORKER_HOSTNAMES': 't1v-0'}],
  ids=['nothing', 'slurm_one_task', 'tpu_one_host'],
)
def test_a_single_process_launch_starts_nothing(launch, env):
  assert launch(env) == []


@pytest.mark.parametrize(
  'env',
  [
    SLURM_TASK,
    {'TPU_WORKER_HOSTNAMES': 't1v-0,t1v-1,t1v-2,t1v-3', 'TPU_WORKER_ID': '1'},
    {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'},
  ],
  ids=['slurm', 'tpu_pod', 'coordinator_env'],
)
def test_a_multi_process_environment_starts_jax_detection(launch, env):
  """No arguments: JAX's own cluster detection reads the environment."""
  assert launch(env) == [((), {})]


def test_explicit_flags_win_over_the_environment(launch):
  calls = launch(SLURM_TASK, '127.0.0.1:5555', 2, 1)
  assert calls == [
    ((), {'coordinator_address': '127.0.0.1:5555', 'num_processes': 2, 'process_id': 1})
  ]


def test_jax_reads_the_slurm_task_as_one_process_per_gpu(launch, monkeypatch):
  """What the started detection makes of SLURM_TASK (JAX's cluster code, read-only: no
  connection is made): coordinator on the first node of the step, 4 processes, this one 2,
  and this process restricted to the GPU of its local task id. Hence the README's SLURM
  recipe runs one task per GPU; one task per node would leave all but one GPU idle."""
  from jax._src import clusters

  launch(SLURM_TASK)
  coordinator, processes, process_id, local_devices = (
    clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None)
  )
  assert coordinator.startswith('gpu007:') and (processes, process_id) == (4, 2)
  assert local_devices == [0]
