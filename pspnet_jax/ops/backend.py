"""Which convolution a program traced in this process holds on the CPU: one setting, read
at trace time by ``pspnet_jax.ops.convolution`` and ``cpu_conv``.

- ``backend``: ``auto`` (the CPU kernels of ``cpu_conv`` when a program is lowered for the
  CPU, XLA's convolution elsewhere) or ``xla`` (XLA's convolution on every platform);
- ``weight_gradient``: ``auto`` (per layer, ``cpu_conv.wgrad_strategy``) or one strategy
  for every CPU layer, ``xla``, ``taps`` or ``shifted``.

Commands set them from their config (keys ``conv.backend``, ``conv.weight_gradient``) with
``configure``; the environment variables ``PSPNET_CONV`` and ``PSPNET_CONV_WGRAD``, when set,
override the config. ``settings()`` is what is in effect, which the commands record (a
training workdir's ``config.json``, an export's ``export.json``, the AOT tool's JSON).
"""

from __future__ import annotations

import os

from pspnet_jax.errors import UserError

CHOICES = {'backend': ('auto', 'xla'), 'weight_gradient': ('auto', 'xla', 'taps', 'shifted')}
ENVIRONMENT = {'backend': 'PSPNET_CONV', 'weight_gradient': 'PSPNET_CONV_WGRAD'}
_configured = {'backend': 'auto', 'weight_gradient': 'auto'}


def _check(key: str, value: str, where: str) -> str:
  if value not in CHOICES[key]:
    raise UserError(f'{where}={value!r}: give one of {", ".join(CHOICES[key])}')
  return value


def configure(backend: str = 'auto', weight_gradient: str = 'auto') -> dict:
  """Sets the convolution settings for programs traced from now on; returns ``settings()``."""
  _configured['backend'] = _check('backend', backend, 'config key conv.backend')
  _configured['weight_gradient'] = _check(
    'weight_gradient', weight_gradient, 'config key conv.weight_gradient'
  )
  return settings()


def settings() -> dict:
  """The settings in effect: the configured ones, each overridden by its environment
  variable when that is set; ``overridden_by`` names the variables that did."""
  out, overridden = {}, []
  for key, variable in ENVIRONMENT.items():
    value = os.environ.get(variable)
    if value:
      out[key] = _check(key, value, variable)
      if value != _configured[key]:
        overridden.append(variable)
    else:
      out[key] = _configured[key]
  out['overridden_by'] = overridden
  return out
