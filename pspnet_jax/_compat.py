"""Every workaround of a library's behaviour, in one place, each with the version it was
observed on. ``tests/test_compat.py`` shows, for each, that the behaviour is still there
without the workaround (so it is still needed) and gone with it (so it still works): when a
library changes, that test says which workaround to drop or mend.

- ``import_summary_writer``: tensorboardX imports torch (2-4 s) when it is installed.
- ``grain_flags_usable``: grain's multiprocessing reads absl flags nobody parsed.
- ``quiet_abandoned_orbax_reads``: a failed orbax restore leaves pages of noise behind.
- ``NoMetricsWarningFilter``: orbax warns at every save without metrics.
- ``allow_multiple_libtpu_load``: libtpu refuses a second process even to compile.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

# The versions each workaround was observed on (tests/test_compat.py prints them).
OBSERVED = {
  'import_summary_writer': 'tensorboardX 2.6.4, torch 2.13.0',
  'grain_flags_usable': 'grain 0.2.18',
  'quiet_abandoned_orbax_reads': 'orbax-checkpoint 0.11',
  'NoMetricsWarningFilter': 'orbax-checkpoint 0.11',
  'allow_multiple_libtpu_load': 'libtpu of jax[tpu] 0.10.2',
}


def import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch, when
  it is installed, only to accept its tensors (which training never passes); that import
  costs 2-4 s at every start of train.py. With torch not yet imported, it is hidden for the
  duration of this import, so tensorboardX takes the path it takes without torch."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules['torch'] = None  # makes ``import torch`` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def grain_flags_usable():
  """Lets grain's ``mp_prefetch`` run outside ``absl.app``: grain reads its absl flag
  ``--grain_enable_multiprocess_worker_profiling`` when it starts workers once a profiler
  is registered (importing jax registers one); unless ``absl.app`` parsed the command line
  first (pytest, notebooks, plain scripts) that raises ``UnparsedFlagAccessError``.
  Marking the flags parsed keeps every default."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def quiet_abandoned_orbax_reads():
  """Installed around a restore: drops the noise a failed one leaves behind, and only that.

  When one array of a restore fails (a truncated file), orbax raises at once but leaves the
  reads of the other arrays pending: when they are collected, each abandoned read
  coroutine reports its own error, or ``RuntimeError: Event loop is closed`` once orbax's
  loop is gone, as an unraisable exception: pages of tracebacks after the one real error,
  which the caller reports; asyncio logs the abandoned tasks' errors as "never retrieved".
  Those are dropped; other unraisable exceptions and log records go through as before."""
  previous = sys.unraisablehook
  if getattr(previous, '_pspnet_filter', False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
      return  # one of orbax's abandoned read coroutines, collected with its error
    if isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
      unraisable.exc_value
    ):
      tb = unraisable.exc_traceback
      while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
      if tb is not None and tb.tb_frame.f_code.co_filename.endswith(
        f'asyncio{os.sep}base_events.py'
      ):
        return  # a read orbax left pending, calling back into its closed event loop
    previous(unraisable)

  hook._pspnet_filter = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_OrbaxTaskFilter())


class _OrbaxTaskFilter(logging.Filter):
  """What asyncio logs for the reads a failed orbax restore abandoned: "Task/Future
  exception was never retrieved" when they are collected, "unhandled exception during
  asyncio.run() shutdown" when orbax's event loop cancels them on closing."""

  _ABANDONED = ('never retrieved', 'unhandled exception during asyncio.run() shutdown')

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:  # the traceback is not in the message
      message += ''.join(traceback.format_exception(*record.exc_info))
    ours = f'{os.sep}orbax{os.sep}' in message or 'OCDBT' in message or 'TensorStore' in message
    return not (ours and any(text in message for text in self._ABANDONED))


class NoMetricsWarningFilter(logging.Filter):
  """orbax's warning on every save without metrics once ``best_fn`` is set: periodic and
  preemption saves have no validation mIoU by design. Installed on the ``absl`` logger."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


def allow_multiple_libtpu_load():
  """Compiling opens no chip, so a second process that loads libtpu (another AOT run) is no
  conflict; without this libtpu refuses to load while another process holds its lockfile.
  Set before libtpu loads; a value the user set is kept."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
