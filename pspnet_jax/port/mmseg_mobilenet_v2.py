"""mmsegmentation MobileNetV2 PSPNet checkpoints (``configs/mobilenet_v2``,
``pspnet_m-v2-d8_512x512_160k_ade20k_*.pth``, ``pspnet_m-v2-d8_512x1024_80k_cityscapes_*.pth``).

Saved as ``{'meta', 'state_dict'}`` (reader.py unwraps). The backbone's keys are the model's
own attribute names under ``backbone.`` (``backbone.conv1.{conv,bn}``,
``backbone.layer{1-7}.{j}.conv.{k}.{conv,bn}``, see ``pspnet_jax.models.mobilenet_v2``);
the heads are mmseg's PSPHead and FCNHead, renamed as for the ResNet checkpoints
(``pspnet_jax.port.mmseg``). The configs resize with align_corners=False.
"""

from pspnet_jax.port.layout import NUM_BATCHES_TRACKED, Layout
from pspnet_jax.port.mmseg import HEAD_RENAMES

STEM_KEY = 'backbone.conv1.conv.weight'
# What the tensors cannot tell: which backbone module, and mmseg's resize convention.
CONFIG = {'backbone': 'mobilenet_v2', 'align_corners': False}


def _recognise(state_dict):
  heads = any(k.startswith('decode_head.') for k in state_dict)
  return f'{STEM_KEY} + decode_head.*' if STEM_KEY in state_dict and heads else None


LAYOUT = Layout(
  name='mmseg-mobilenet_v2',
  description='mmsegmentation PSPNet, MobileNetV2 (pspnet_m-v2-d8_*.pth)',
  renames=((r'^backbone\.', ''), *HEAD_RENAMES),
  drops=(NUM_BATCHES_TRACKED,),
  config=CONFIG,
  backbone_only=False,
  recognise=_recognise,
)
