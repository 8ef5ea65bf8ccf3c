"""torchvision's ImageNet MobileNetV2 (``torchvision.models.mobilenet_v2(weights=...)``).

The same network as mmcls's (``pspnet_jax.port.mmcls_mobilenet_v2``) in one Sequential:
``features.0.{0,1}`` is the stem conv and BN (``conv1``), ``features.1..17`` the 17 inverted
residual blocks in order (``layer{i}.{j}``). A block's Conv-BN-ReLU6 triples are
``conv.{k}.{0,1}`` and its projection is ``conv.{n}`` (conv) and ``conv.{n+1}`` (BN), where
mmseg has ``conv.{k}.{conv,bn}``. ``features.18`` (1x1 320 -> 1280) and ``classifier.*``
are dropped. Backbone only, as the mmcls layout.
"""

from pspnet_jax.models.mobilenet_v2 import ARCH
from pspnet_jax.port.layout import NUM_BATCHES_TRACKED, Layout
from pspnet_jax.port.mmcls_mobilenet_v2 import LAYOUT as MMCLS


def _renames():
  rules, feature = [], 1
  for layer, (expand, _, blocks) in enumerate(ARCH, start=1):
    for j in range(blocks):
      src, dst = rf'^features\.{feature}\.conv\.', f'layer{layer}.{j}.conv.'
      activated = 1 if expand == 1 else 2  # Conv-BN-ReLU6 triples before the projection
      for k in range(activated):
        rules += [(rf'{src}{k}\.0\.', f'{dst}{k}.conv.'), (rf'{src}{k}\.1\.', f'{dst}{k}.bn.')]
      rules += [
        (rf'{src}{activated}\.', f'{dst}{activated}.conv.'),
        (rf'{src}{activated + 1}\.', f'{dst}{activated}.bn.'),
      ]
      feature += 1
  return ((r'^features\.0\.0\.', 'conv1.conv.'), (r'^features\.0\.1\.', 'conv1.bn.'), *rules)


def _recognise(state_dict):
  return 'features.0.0.weight' if 'features.0.0.weight' in state_dict else None


LAYOUT = Layout(
  name='torchvision-mobilenet_v2',
  description='torchvision ImageNet MobileNetV2 (mobilenet_v2 weights)',
  renames=_renames(),
  drops=(
    NUM_BATCHES_TRACKED,
    (
      rf'^features\.{sum(n for _, _, n in ARCH) + 1}\.',
      'ImageNet feature conv 320 -> 1280 (features.18.*)',
    ),
    (r'^classifier\.', 'ImageNet classifier (classifier.*)'),
  ),
  config=MMCLS.config,
  backbone_only=True,
  recognise=_recognise,
)
