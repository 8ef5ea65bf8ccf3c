"""Import PyTorch PSPNet / ResNet weights into pspnet_jax models.

``model, config = load_torch(path)`` ports a semseg, semseg ImageNet, mmseg or torchvision
checkpoint (``.pth`` or ``.safetensors``); ``python -m pspnet_jax.port SRC --out DIR``
writes it as a model directory. ``load_state_dict`` / ``export_state_dict`` are the
canonical (semseg-layout) mapping underneath.
"""

from pspnet_jax.port.convert import LAYOUTS, Ported, load_torch, port_checkpoint
from pspnet_jax.port.mapping import (PortError, StateDictMismatch, export_state_dict,
                                     expected_keys, load_state_dict, torch_key)

__all__ = ['LAYOUTS', 'PortError', 'Ported', 'StateDictMismatch', 'export_state_dict',
           'expected_keys', 'load_state_dict', 'load_torch', 'port_checkpoint', 'torch_key']
