"""What a source checkpoint layout is: key renames to the canonical (semseg) layout, the
keys it drops and why, and the architecture facts its tensors cannot tell.

Each layout module (``semseg``, ``semseg_imagenet``, ``mmseg``, ``torchvision_resnet``)
declares one ``Layout``; ``pspnet_jax.port.mapping`` then fills the model from canonical
keys. Nothing here knows about NNX.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from pspnet_jax.port.mapping import PortError

# Every PyTorch BatchNorm2d carries a step counter; BN here uses a fixed momentum and
# inference never reads it.
NUM_BATCHES_TRACKED = (r'(^|\.)num_batches_tracked$', 'BN step counters (num_batches_tracked)')
# ImageNet classifier of a backbone-only file: PSPNet has no use for it.
IMAGENET_CLASSIFIER = (r'^fc\.', 'ImageNet classifier (fc.*)')
# Canonical keys of the PSPNet heads, dropped when a full checkpoint is ported backbone-only.
HEADS = (r'^(ppm|cls|aux)\.', 'PSPNet heads (ppm, cls, aux): backbone-only port')


@dataclasses.dataclass(frozen=True)
class Layout:
  """One source layout.

  renames: (regex on a file key, replacement) pairs; the first that matches renames the
    key to its canonical name; keys no rule matches keep their name (and are reported as
    unexpected if the model has no such key).
  drops: (regex on a file key, reason) pairs: keys deliberately not used.
  config: ``PSPNetConfig`` fields that the tensors' shapes cannot tell (dilation
    contraction, resize convention); depth, stem, widths and classes come from shapes.
  recognise: state dict -> the key that identifies this layout, or None.
  """

  name: str
  description: str
  renames: tuple[tuple[str, str], ...]
  drops: tuple[tuple[str, str], ...]
  config: Mapping[str, object]
  backbone_only: bool
  recognise: Callable[[Mapping[str, np.ndarray]], str | None]

  def to_canonical(self, state_dict: Mapping[str, np.ndarray], *, backbone_only: bool, source: str):
    """-> (canonical state dict, canonical key -> file key, reason -> dropped file keys)."""
    canonical, file_keys, dropped = {}, {}, {}
    rules = [(re.compile(p), r) for p, r in self.renames]
    drops = [(re.compile(p), why) for p, why in self.drops]
    for key, value in state_dict.items():
      why = next((why for p, why in drops if p.search(key)), None)
      if why is None:
        new = next((p.sub(r, key, count=1) for p, r in rules if p.search(key)), key)
        if backbone_only and re.search(HEADS[0], new):
          why = HEADS[1]
      if why is not None:
        dropped.setdefault(why, []).append(key)
        continue
      if new in canonical:
        raise PortError(
          f'{source}: keys {file_keys[new]!r} and {key!r} both map to {new!r} '
          f'in the {self.name} layout; is this file really {self.name}?'
        )
      canonical[new], file_keys[new] = value, key
    return canonical, file_keys, dropped


def conv_kernel_size(state_dict: Mapping[str, np.ndarray], key: str) -> int | None:
  """Spatial size of a conv weight [out, in, k, k] in the file, or None if absent."""
  value = state_dict.get(key)
  return int(np.shape(value)[-1]) if value is not None and np.ndim(value) == 4 else None
