import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import filelock
import pytest

# Tests import the in-tree reference modules (tests/torch_reference.py) by name.
sys.path.insert(0, os.path.dirname(__file__))

import cli  # noqa: E402  (after the path above)
import tiny_run  # noqa: E402


def pytest_configure(config):
  """One XLA compilation cache for the subprocesses of this session (see tests/cli.py).
  Under pytest-xdist the controller makes it and hands it to every worker, so the workers
  share it too."""
  worker = getattr(config, 'workerinput', None)
  if worker is not None:
    cli.COMPILE_CACHE = worker['pspnet_compile_cache']
    return
  cli.COMPILE_CACHE = tempfile.mkdtemp(prefix='pspnet_jax_test_xla_cache_')
  config._pspnet_owns_cache = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """pytest-xdist: hand the session's cache folder to a worker it starts."""
  node.workerinput['pspnet_compile_cache'] = cli.COMPILE_CACHE


def pytest_unconfigure(config):
  if getattr(config, '_pspnet_owns_cache', False) and cli.COMPILE_CACHE is not None:
    shutil.rmtree(cli.COMPILE_CACHE, ignore_errors=True)
    cli.COMPILE_CACHE = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under PSPNET_REQUIRE_PARITY (set by .ci/run) a skipped parity, aot or browser test fails
  the run."""
  outcome = yield
  report = outcome.get_result()
  marker = next(
    (m for m in map(item.get_closest_marker, ('parity', 'aot', 'browser')) if m is not None), None
  )
  if report.skipped and marker is not None and os.environ.get('PSPNET_REQUIRE_PARITY'):
    report.outcome = 'failed'
    report.longrepr = f'{marker.name} test was skipped, which CI does not allow: {report.longrepr}'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The tiny synthetic_shapes dataset (tests/tiny_run.py); a module may define its own."""
  return tiny_run.prepare_data(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory):
  """(workdir, finished train.py process) of the tiny 12-step run (tests/tiny_run.py),
  trained once for the whole session and shared: test_train_loop compares its own runs with
  it, test_quantize and test_prune start from it. Read it; never write into its workdir.

  Under pytest-xdist the first worker that asks trains it in the session's shared folder,
  under a file lock, and the others wait for it and read it (xdist's groups alone did not
  keep its tests on one worker: it was trained twice)."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  done = shared / 'reference_run.json'
  with filelock.FileLock(str(shared / 'reference_run.lock')):
    if not done.exists():
      workdir = shared / 'reference_run'
      p = tiny_run.train(workdir, tiny_run.prepare_data(shared / 'reference_run_tfds'))
      done.write_text(json.dumps({'workdir': str(workdir), 'args': p.args, 'stdout': p.stdout}))
  record = json.loads(done.read_text())
  return pathlib.Path(record['workdir']), subprocess.CompletedProcess(
    record['args'], 0, record['stdout'], ''
  )


# Fixtures that cost tens of seconds (a train.py run, an export, a compiled
# initialisation, a 20-step recipe run, a full-width Caffe net). Under pytest-xdist
# (``--dist loadgroup``, as `make test` runs it) the tests that share one form a group that
# runs on one worker, so it is built once; every other test is spread by load. The session's
# ``reference_run`` needs no group: its file lock builds it once for all workers.
EXPENSIVE_MODULE_FIXTURES = (
  'int8_export',
  'exported',
  'fresh_and_expected',
  'recipe_run',
  'ade20k50',
  'mmseg_file',
  'mmseg_checkpoint',
  'small_semseg',
  'segmenter',
)
# The files whose tests run train.py / eval.py / multi-device subprocesses (minutes each, a
# group of them ~5 min) go first, so the workers do not end on them one at a time.
SLOW_FILES_FIRST = ('test_train_loop.py', 'test_evaluation.py', 'test_export.py', 'test_aot.py')


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
  for item in items:
    shared = [f for f in EXPENSIVE_MODULE_FIXTURES if f in getattr(item, 'fixturenames', ())]
    if shared:
      item.add_marker(pytest.mark.xdist_group(f'{item.module.__name__}:{shared[0]}'))

  def rank(item):
    name = os.path.basename(str(item.fspath))
    return SLOW_FILES_FIRST.index(name) if name in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

  items.sort(key=rank)  # stable: the order within a file stays
