"""semseg's ImageNet ResNet initialisations (``resnet50_v2.pth``, ``resnet101_v2.pth``, ...).

A bare state dict of semseg's ``model/resnet.py`` with ``deep_base=True``: the deep stem as
``conv1/bn1/conv2/bn2/conv3/bn3`` (conv1 is 64x3x3x3), then ``layer1..layer4``, and maybe
the ImageNet classifier ``fc.*`` (dropped). semseg's PSPNet builds ``layer0`` from exactly
these six modules and dilates every block of layer3/layer4, so they become ``layer0.{0,1,3,
4,6,7}``. Backbone only: the PSPNet heads are freshly initialised.
"""

from pspnet_jax.port.layout import (
  IMAGENET_CLASSIFIER,
  NUM_BATCHES_TRACKED,
  Layout,
  conv_kernel_size,
)

# conv{i} / bn{i} -> index in semseg's layer0 Sequential (conv, BN, ReLU) x 3.
STEM = (('conv1', 0), ('bn1', 1), ('conv2', 3), ('bn2', 4), ('conv3', 6), ('bn3', 7))


def _recognise(state_dict):
  deep_stem = conv_kernel_size(state_dict, 'conv1.weight') == 3 and 'conv3.weight' in state_dict
  return 'conv1.weight (3x3) + conv3.weight' if deep_stem else None


LAYOUT = Layout(
  name='semseg-imagenet',
  description='semseg ImageNet ResNet (resnet50_v2.pth)',
  renames=tuple((rf'^{name}\.', f'layer0.{index}.') for name, index in STEM),
  drops=(NUM_BATCHES_TRACKED, IMAGENET_CLASSIFIER),
  config={'contract_dilation': False, 'align_corners': True},
  backbone_only=True,
  recognise=_recognise,
)
