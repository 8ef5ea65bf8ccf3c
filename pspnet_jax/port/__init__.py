"""Import PyTorch and Caffe PSPNet / ResNet weights into pspnet_jax models.

``model, config = load_torch(path)`` ports a semseg, semseg ImageNet, mmseg or torchvision
checkpoint (``.pth`` or ``.safetensors``); ``load_caffe(path, prototxt=None)`` one of the
authors' Caffe releases (``.caffemodel``, no Caffe needed); ``python -m pspnet_jax.port SRC
--out DIR`` writes either as a model directory. ``load_state_dict`` / ``export_state_dict``
are the canonical (semseg-layout) mapping underneath.
"""

from pspnet_jax.port.convert import CAFFE, LAYOUTS, Ported, load_caffe, load_torch, port_checkpoint
from pspnet_jax.port.mapping import (
  PortError,
  StateDictMismatch,
  expected_keys,
  export_state_dict,
  load_state_dict,
  torch_key,
)

__all__ = [
  'CAFFE',
  'LAYOUTS',
  'PortError',
  'Ported',
  'StateDictMismatch',
  'export_state_dict',
  'expected_keys',
  'load_caffe',
  'load_state_dict',
  'load_torch',
  'port_checkpoint',
  'torch_key',
]
