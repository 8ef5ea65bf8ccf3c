"""torchvision ResNet ImageNet weights (``torchvision.models.resnet50(weights=...)``).

A bare state dict: ``conv1`` (7x7, 64), ``bn1``, ``layer1..layer4``, ``fc.*`` (dropped).
The stem becomes ``layer0.{0,1}`` of the ``torchvision`` stem. torchvision dilates with
``replace_stride_with_dilation``, which gives the first block of a dilated layer the
previous layer's dilation, i.e. ``contract_dilation=True``. Backbone only.
"""

from pspnet_jax.port.layout import (
  IMAGENET_CLASSIFIER,
  NUM_BATCHES_TRACKED,
  Layout,
  conv_kernel_size,
)


def _recognise(state_dict):
  seven = conv_kernel_size(state_dict, 'conv1.weight') == 7 and 'conv2.weight' not in state_dict
  return 'conv1.weight (7x7)' if seven else None


LAYOUT = Layout(
  name='torchvision',
  description='torchvision ResNet (resnet50 ImageNet weights)',
  renames=((r'^conv1\.', 'layer0.0.'), (r'^bn1\.', 'layer0.1.')),
  drops=(NUM_BATCHES_TRACKED, IMAGENET_CLASSIFIER),
  config={'contract_dilation': True, 'align_corners': True},
  backbone_only=True,
  recognise=_recognise,
)
