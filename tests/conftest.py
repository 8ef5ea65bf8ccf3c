import os
import shutil
import sys
import tempfile

import pytest

# Tests import the in-tree reference modules (tests/torch_reference.py) by name.
sys.path.insert(0, os.path.dirname(__file__))

import cli  # noqa: E402  (after the path above)


def pytest_configure(config):
  """One XLA compilation cache for the subprocesses of this session (see tests/cli.py)."""
  cli.COMPILE_CACHE = tempfile.mkdtemp(prefix='pspnet_jax_test_xla_cache_')


def pytest_unconfigure(config):
  if cli.COMPILE_CACHE is not None:
    shutil.rmtree(cli.COMPILE_CACHE, ignore_errors=True)
    cli.COMPILE_CACHE = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under PSPNET_REQUIRE_PARITY (set by .ci/run) a skipped parity or aot test fails the run."""
  outcome = yield
  report = outcome.get_result()
  marker = item.get_closest_marker('parity') or item.get_closest_marker('aot')
  if report.skipped and marker is not None and os.environ.get('PSPNET_REQUIRE_PARITY'):
    report.outcome = 'failed'
    report.longrepr = f'{marker.name} test was skipped, which CI does not allow: {report.longrepr}'
