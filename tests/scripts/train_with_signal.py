"""train.py with a signal sent from inside the training loop after a chosen step (an outside
signal races a fast machine), through the loop's AFTER_STEP_HOOKS:

  python tests/scripts/train_with_signal.py STEP:SIGNAL[:SIGNAL...][@CHECKPOINT] TRAIN.PY ARGS...

``7:KILL`` sends SIGKILL after step 7; ``8:INT:INT`` two SIGINTs (Ctrl-C twice); ``@4``
first waits until the checkpoint of step 4 is finished on disk (so that a resume has one).
"""

import os
import runpy
import signal
import sys
import time

spec, workdir = sys.argv[1], sys.argv[sys.argv.index('--workdir') + 1]
spec, _, wait_for = spec.partition('@')
at, *names = spec.split(':')


def send(step):
  if step != int(at):
    return
  deadline = time.time() + 120
  while wait_for and not os.path.isdir(os.path.join(workdir, 'checkpoints', wait_for)):
    if time.time() > deadline:
      raise TimeoutError(f'checkpoint {wait_for} never finished')
    time.sleep(0.05)
  for name in names:
    os.kill(os.getpid(), getattr(signal, 'SIG' + name))


from pspnet_jax.train import loop  # noqa: E402  (after the arguments are read)

loop.AFTER_STEP_HOOKS.append(send)
sys.argv = [
  os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'train.py'
  ),
  *sys.argv[2:],
]
runpy.run_path(sys.argv[0], run_name='__main__')
