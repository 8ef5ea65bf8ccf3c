"""Flax NNX models: the dilated ResNet and MobileNetV2 backbones and PSPNet."""

from pspnet_jax.models.mobilenet_v2 import MobileNetV2
from pspnet_jax.models.pspnet import PSPNet, PSPNetConfig
from pspnet_jax.models.resnet import ResNet

__all__ = ['MobileNetV2', 'PSPNet', 'PSPNetConfig', 'ResNet']
