"""`python -m pspnet_jax.demo`, the README's smoke run of the model alone."""

import os
import re
import subprocess
import sys

from cli import cli_env
from torch_reference import TorchPSPNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_a_random_pspnet_and_reports_it():
  """A small size keeps it quick: exit 0, a prediction at the input size, the warning that
  the weights are random, and the parameter count of the same PSPNet built in PyTorch."""
  p = subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.demo', '--size', '33', '--depth', '18', '--classes', '5'],
    env=cli_env(),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'RANDOMLY INITIALISED' in p.stdout
  assert re.search(r'prediction\s+\(1, 33, 33\) int32', p.stdout), p.stdout
  n_torch = sum(t.numel() for t in TorchPSPNet(num_classes=5, depth=18).parameters())
  assert f'PSPNet-18, 5 classes, {n_torch / 1e6:.1f}M parameters' in p.stdout, (n_torch, p.stdout)
  assert re.search(r'forward\s+\d+\.\d+ s', p.stdout), p.stdout
