"""torchvision's ImageNet ShuffleNetV2 (``torchvision.models.shufflenet_v2_x0_5 / x1_0 /
x1_5 / x2_0(weights=...)``).

A bare state dict whose keys are the model's own (``pspnet_jax.models.shufflenet_v2``):
``conv1.{0,1}``, ``stage{2-4}.{j}.branch1.{0-3}`` (first unit of a stage),
``stage{2-4}.{j}.branch2.{0,1,3,4,5,6}``, ``conv5.{0,1}``; ``fc.*`` (the ImageNet
classifier) is dropped, nothing is renamed. The width comes from the tensors
(``pspnet_jax.port.architecture``). Backbone only; the fresh heads are those of the
MobileNetV2 recipe (mmseg's PSPHead: 512-channel pyramid branches, align_corners=False).
"""

from pspnet_jax.port.layout import IMAGENET_CLASSIFIER, NUM_BATCHES_TRACKED, Layout

KEY = 'stage2.0.branch1.0.weight'
CONFIG = {'backbone': 'shufflenet_v2', 'align_corners': False, 'ppm_channels': 512}


def _recognise(state_dict):
  return KEY if KEY in state_dict else None


LAYOUT = Layout(
  name='torchvision-shufflenet_v2',
  description='torchvision ImageNet ShuffleNetV2 (shufflenet_v2_x0_5 ... x2_0 weights)',
  renames=(),
  drops=(NUM_BATCHES_TRACKED, IMAGENET_CLASSIFIER),
  config=CONFIG,
  backbone_only=True,
  recognise=_recognise,
)
