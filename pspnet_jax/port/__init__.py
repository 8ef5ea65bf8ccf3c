"""Import PyTorch PSPNet / ResNet weights into pspnet_jax models."""

from pspnet_jax.port.mapping import (StateDictMismatch, export_state_dict, expected_keys,
                                     load_state_dict, torch_key)

__all__ = ['StateDictMismatch', 'export_state_dict', 'expected_keys', 'load_state_dict',
           'torch_key']
