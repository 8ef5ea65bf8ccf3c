"""mmclassification's ImageNet MobileNetV2 (``mmcls://mobilenet_v2``,
``mobilenet_v2_batch256_imagenet_*.pth``), the initialisation of mmseg's MobileNetV2 PSPNets.

``{'meta', 'state_dict'}`` with ``backbone.conv1``, ``backbone.layer1..layer7`` (mmcls's
MobileNetV2 has mmseg's key names; mmseg only dilates it), ``backbone.conv2`` (the 1x1
320 -> 1280 conv of the classifier, dropped) and ``head.fc.*`` (dropped). A file without the
``backbone.`` prefix (what mmcv's ``mmcls://`` loader hands mmseg) is read the same way.
Backbone only; the fresh heads are mmseg's (pyramid branches of 512 channels).
"""

from pspnet_jax.port.layout import NUM_BATCHES_TRACKED, Layout
from pspnet_jax.port.mmseg_mobilenet_v2 import CONFIG, STEM_KEY

BARE_STEM_KEY = STEM_KEY[len('backbone.') :]


def _recognise(state_dict):
  if any(k.startswith('decode_head.') for k in state_dict):
    return None
  return next((k for k in (STEM_KEY, BARE_STEM_KEY) if k in state_dict), None)


LAYOUT = Layout(
  name='mmcls-mobilenet_v2',
  description='mmclassification ImageNet MobileNetV2 (mmcls://mobilenet_v2)',
  renames=((r'^backbone\.', ''),),
  drops=(
    NUM_BATCHES_TRACKED,
    (r'^(backbone\.)?conv2\.', 'ImageNet feature conv 320 -> 1280 (conv2.*)'),
    (r'^head\.', 'ImageNet classifier (head.*)'),
  ),
  config={**CONFIG, 'ppm_channels': 512},
  backbone_only=True,
  recognise=_recognise,
)
