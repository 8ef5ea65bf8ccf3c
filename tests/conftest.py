import os
import sys

import pytest

# Tests import the in-tree reference modules (tests/torch_reference.py) by name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under PSPNET_REQUIRE_PARITY (set by .ci/run) a skipped parity or aot test fails the run."""
  outcome = yield
  report = outcome.get_result()
  marker = item.get_closest_marker('parity') or item.get_closest_marker('aot')
  if report.skipped and marker is not None and os.environ.get('PSPNET_REQUIRE_PARITY'):
    report.outcome = 'failed'
    report.longrepr = f'{marker.name} test was skipped, which CI does not allow: {report.longrepr}'
