"""Each workaround in pspnet_jax/_compat.py: the behaviour it works around is still there
without it (else this test fails: drop the workaround) and gone with it (else it fails:
mend the workaround). The versions each was observed on are in ``_compat.OBSERVED``."""

import logging
import subprocess
import sys
import textwrap

import pytest
from cli import ROOT, cli_env
from test_aot import AOT_PYTHON, needs_libtpu

from pspnet_jax import _compat


def _python(code: str, *args, python=sys.executable, env=None, timeout=300):
  return subprocess.run(
    [python, '-c', textwrap.dedent(code), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env or cli_env(),
    cwd=ROOT,
  )


def test_observed_versions_are_recorded_for_every_workaround():
  public = {
    n
    for n in dir(_compat)
    if not n.startswith('_')
    and n not in ('OBSERVED', 'annotations')
    and callable(getattr(_compat, n))
    and getattr(_compat, n).__module__ == _compat.__name__
  }
  assert public == set(_compat.OBSERVED), public ^ set(_compat.OBSERVED)


def test_tensorboardx_imports_torch_unless_hidden():
  pytest.importorskip('torch')
  code = """
    import sys
    if sys.argv[1] == 'fix':
      from pspnet_jax._compat import import_summary_writer
      import_summary_writer()
    else:
      from tensorboardX import SummaryWriter
    print('torch' in sys.modules)
  """
  assert _python(code, 'raw').stdout.strip() == 'True'  # tensorboardX pulls torch in
  assert _python(code, 'fix').stdout.strip() == 'False'  # not through the workaround


GRAIN = """
  import sys
  import grain
  import jax  # registers a profiler: grain then reads its absl flag when workers start

  def main():
    if sys.argv[1] == 'fix':
      from pspnet_jax._compat import grain_flags_usable
      grain_flags_usable()
    options = grain.MultiprocessingOptions(num_workers=1)
    print(list(grain.MapDataset.range(4).to_iter_dataset().mp_prefetch(options)))

  if __name__ == '__main__':
    main()
"""


def test_grain_workers_outside_absl_app_need_the_flags_marked_parsed(tmp_path):
  script = tmp_path / 'grain_workers.py'  # a file: the worker processes import it
  script.write_text(textwrap.dedent(GRAIN))
  run = lambda mode: subprocess.run(
    [sys.executable, str(script), mode],
    capture_output=True,
    text=True,
    timeout=300,
    env=cli_env(),
    cwd=ROOT,
  )
  raw = run('raw')
  assert raw.returncode != 0 and 'UnparsedFlagAccessError' in raw.stderr, raw.stderr[-2000:]
  fixed = run('fix')
  assert fixed.returncode == 0 and fixed.stdout.strip() == '[0, 1, 2, 3]', fixed.stderr[-2000:]


def test_a_failed_orbax_restore_leaves_pages_of_noise_unless_quieted(tmp_path):
  """Whether a read is still pending when the first one fails depends on timing: 20
  restores a process, up to 3 processes, show the noise (measured: 172-504 tracebacks in
  each of 6 processes of 20 restores; in 1 of 3 processes of 8, none)."""
  code = """
    import gc, pathlib, sys
    import jax, jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = pathlib.Path(sys.argv[2]) / 'checkpoint'
    tree = {f'a{i}': jnp.arange(20000 * (i + 1), dtype=jnp.float32) for i in range(16)}
    with ocp.StandardCheckpointer() as c:
      c.save(directory, tree)
    size, victim = max((f.stat().st_size, f) for f in directory.rglob('*')
                       if f.is_file() and f.parent.name == 'd')
    victim.write_bytes(victim.read_bytes()[:size // 2])  # a truncated file
    if sys.argv[1] == 'fix':
      from pspnet_jax._compat import quiet_abandoned_orbax_reads
      quiet_abandoned_orbax_reads()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    for _ in range(20):
      try:
        with ocp.StandardCheckpointer() as c:
          c.restore(directory, target)
      except Exception as e:
        print('the one error:', type(e).__name__, file=sys.stderr)
      gc.collect()
  """
  noise = lambda text: sum(
    text.count(s) for s in ('Traceback', 'never retrieved', 'Exception ignored')
  )
  raw = [_python(code, 'raw', str(tmp_path / 'raw0'))]
  while not noise(raw[-1].stderr) and len(raw) < 3:
    raw.append(_python(code, 'raw', str(tmp_path / f'raw{len(raw)}')))
  assert noise(raw[-1].stderr) > 3 and 'the one error' in raw[-1].stderr, raw[-1].stderr[-2000:]
  fixed = _python(code, 'fix', str(tmp_path / 'fix'))
  assert fixed.stderr.splitlines() == ['the one error: Exception'] * 20, fixed.stderr[-3000:]


def test_orbax_warns_at_each_save_without_metrics_unless_filtered(tmp_path):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  records = []
  handler = logging.Handler()
  handler.emit = records.append
  absl_logger = logging.getLogger('absl')
  absl_logger.addHandler(handler)
  # A checkpointer made earlier in this process installed the filter for good: set aside.
  installed = [f for f in absl_logger.filters if isinstance(f, _compat.NoMetricsWarningFilter)]
  for f in installed:
    absl_logger.removeFilter(f)
  try:
    for filtered in (False, True):
      records.clear()
      flt = _compat.NoMetricsWarningFilter()
      if filtered:
        absl_logger.addFilter(flt)
      options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m['miou'], enable_async_checkpointing=False
      )
      with ocp.CheckpointManager(tmp_path / f'filtered_{filtered}', options=options) as manager:
        manager.save(1, args=ocp.args.Composite(x=ocp.args.StandardSave({'w': jnp.zeros(3)})))
      absl_logger.removeFilter(flt)
      warned = any('did not provide metrics' in r.getMessage() for r in records)
      assert warned is not filtered, (filtered, [r.getMessage() for r in records])
  finally:
    absl_logger.removeHandler(handler)
    for f in installed:
      absl_logger.addFilter(f)


@pytest.mark.aot
@needs_libtpu
def test_a_second_libtpu_process_needs_allow_multiple_libtpu_load():
  """A process that probed for a TPU (jax.devices() without JAX_PLATFORMS) holds libtpu's
  lockfile; a second one, compiling only, cannot load libtpu unless allowed."""
  env = {
    k: v for k, v in cli_env().items() if k not in ('JAX_PLATFORMS', 'ALLOW_MULTIPLE_LIBTPU_LOAD')
  }
  holder = subprocess.Popen(
    [
      AOT_PYTHON,
      '-c',
      'import jax, sys, time; jax.devices(); print("held", flush=True); time.sleep(120)',
    ],
    stdout=subprocess.PIPE,
    text=True,
    env=env,
    cwd=ROOT,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    code = """
      import sys
      from pspnet_jax import _compat
      if sys.argv[1] == 'fix':
        _compat.allow_multiple_libtpu_load()
      from jax.experimental import topologies
      try:
        print(len(topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices))
      except Exception as e:
        print(type(e).__name__, e)
    """
    raw = _python(code, 'raw', python=AOT_PYTHON, env=env)
    assert 'lockfile' in raw.stdout, raw.stdout[-2000:] + raw.stderr[-2000:]
    fixed = _python(code, 'fix', python=AOT_PYTHON, env=env)
    assert fixed.stdout.strip() == '4', fixed.stdout[-2000:] + fixed.stderr[-2000:]
  finally:
    holder.kill()
    holder.wait(timeout=60)
