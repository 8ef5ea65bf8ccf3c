"""Flax NNX models: the dilated ResNet, MobileNetV2 and ShuffleNetV2 backbones and PSPNet."""

from pspnet_jax.models.mobilenet_v2 import MobileNetV2
from pspnet_jax.models.pspnet import PSPNet, PSPNetConfig
from pspnet_jax.models.resnet import ResNet
from pspnet_jax.models.shufflenet_v2 import ShuffleNetV2

__all__ = ['MobileNetV2', 'PSPNet', 'PSPNetConfig', 'ResNet', 'ShuffleNetV2']
