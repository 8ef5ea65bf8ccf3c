"""Reads a PyTorch checkpoint file into a flat state dict of NumPy arrays.

The one place that touches ``.pth`` / ``.safetensors`` files. torch is imported here only,
lazily, when a pickle file is read: ``.safetensors`` files need no torch. Wrappers are
removed the way the reference says every layout needs: a top-level ``state_dict`` entry is
unwrapped (semseg's ``{'epoch', 'state_dict', 'optimizer'}``, mmseg's
``{'meta', 'state_dict'}``) and a ``module.`` prefix (``nn.DataParallel``) is stripped.
Renaming keys is each layout module's job, not this one's.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping

import numpy as np

from pspnet_jax.port.mapping import PortError

SAFETENSORS_SUFFIX = '.safetensors'
DATA_PARALLEL_PREFIX = 'module.'


@dataclasses.dataclass
class SourceFile:
  """What was read: tensors under the file's own key names, and what was set aside."""

  tensors: dict[str, np.ndarray]
  kind: str  # 'safetensors' | 'torch.save'
  ignored_entries: list[str]  # top-level entries beside 'state_dict' (epoch, optimizer, meta)
  stripped_prefix: str | None

  def describe(self) -> str:
    parts = [self.kind]
    if self.ignored_entries:
      parts.append(f'state_dict unwrapped, ignored {", ".join(self.ignored_entries)}')
    if self.stripped_prefix:
      parts.append(f'{self.stripped_prefix!r} prefix stripped')
    return '; '.join(parts)


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> SourceFile:
  """``path`` -> its tensors with the file's own key names (wrappers removed).

  ``trust_pickle``: load ``.pth`` files with ``weights_only=False``, which runs arbitrary
  code from the file; only needed for checkpoints holding Python objects other than
  tensors and plain containers (e.g. mmengine's message hub), and only for trusted files.
  Raises ``PortError`` with a one-line message naming the file when it cannot be read.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  if _is_safetensors(path):
    tensors, kind, ignored = _read_safetensors(path), 'safetensors', []
  else:
    (tensors, ignored), kind = _read_torch(path, trust_pickle), 'torch.save'
  if not tensors:
    raise PortError(f'{path}: the state dict is empty')
  stripped = None
  if all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
    tensors = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    stripped = DATA_PARALLEL_PREFIX
  return SourceFile(tensors, kind, ignored, stripped)


def looks_like_torch(path: str) -> bool:
  """A ``.safetensors`` file, or a ``torch.save`` file (zip or pickle header)."""
  if _is_safetensors(path):
    return True
  with open(path, 'rb') as f:
    magic = f.read(2)
  return magic[:2] == b'PK' or magic[:1] == b'\x80'


def _is_safetensors(path: str) -> bool:
  """By name, or by header (8-byte little-endian length, then JSON) whatever the name."""
  if path.endswith(SAFETENSORS_SUFFIX):
    return True
  with open(path, 'rb') as f:
    head = f.read(9)
  return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < 2**32


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    raise PortError(
      f'{path}: reading .safetensors files needs safetensors: pip install safetensors'
    ) from None
  try:
    return load_file(path)
  except Exception as e:  # SafetensorError, OSError, ValueError (bfloat16): one line
    raise PortError(f'{path}: not a readable .safetensors file ({_one_line(e)})') from None


def _read_torch(path: str, trust_pickle: bool) -> tuple[dict[str, np.ndarray], list[str]]:
  try:
    import torch
  except ImportError:
    raise PortError(
      f'{path}: reading a PyTorch .pth checkpoint needs torch: pip install torch '
      '(or convert the file to .safetensors, which needs no torch)'
    ) from None
  with open(path, 'rb') as f:
    magic = f.read(2)
  # torch.save writes a zip archive (PK) or, before torch 1.6, a pickle (protocol byte
  # 0x80). Anything else is not a checkpoint, and torch's weights-only unpickler would
  # report it as an unsafe pickle, which misleads.
  if magic[:2] != b'PK' and magic[:1] != b'\x80':
    raise PortError(
      f'{path}: not a PyTorch checkpoint (a torch.save file starts with a zip '
      f'or pickle header; this one starts with {magic!r})'
    )
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    if unsafe and not trust_pickle:
      raise PortError(
        f'{path}: holds a Python object of type {unsafe.group(1)}, which '
        'torch.load(weights_only=True) refuses to unpickle; if you trust the file, pass '
        'trust_pickle=True (CLI: --trust-pickle), or re-save only its state_dict'
      ) from None
    # torch's message is a page of advice; its WeightsUnpickler line is the cause.
    cause = re.search(r'WeightsUnpickler error:\s*(.+)', str(e))
    raise PortError(
      f'{path}: not a readable PyTorch checkpoint, corrupt or truncated '
      f'({cause.group(1) if cause else _one_line(e)})'
    ) from None
  except Exception as e:  # truncated zip, random bytes, EOF: torch raises many types
    raise PortError(
      f'{path}: not a readable PyTorch checkpoint, truncated or not written by '
      f'torch.save ({type(e).__name__}: {_one_line(e)})'
    ) from None
  state, ignored = _unwrap(obj, path)
  out, not_tensors = {}, []
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      not_tensors.append(key)
      continue
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
      value = value.float()  # NumPy has no bfloat16; half is widened once here
    out[str(key)] = value.numpy()
  if not_tensors:
    raise PortError(
      f'{path}: the state dict holds non-tensor entries '
      f'{sorted(map(str, not_tensors))[:5]}; expected parameter names -> tensors'
    )
  return out, ignored


def _unwrap(obj, path: str) -> tuple[Mapping, list[str]]:
  ignored = []
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    ignored = sorted(str(k) for k in obj if k != 'state_dict')
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise PortError(
      f'{path}: holds a {type(obj).__name__}, not a state dict '
      '(save model.state_dict(), not the model object)'
    )
  return obj, ignored


def _one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
