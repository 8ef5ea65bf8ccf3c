"""Flax NNX models: the dilated ResNet backbone and PSPNet."""

from pspnet_jax.models.pspnet import PSPNet, PSPNetConfig
from pspnet_jax.models.resnet import ResNet

__all__ = ['PSPNet', 'PSPNetConfig', 'ResNet']
