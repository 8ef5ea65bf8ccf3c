"""mmsegmentation PSPNet checkpoints (ResNetV1c backbone, ``configs/pspnet``).

Saved as ``{'meta', 'state_dict'}`` (reader.py unwraps). ResNetV1c's deep stem is
``backbone.stem.{0,3,6}`` convs (3->32->32->64 at ResNet-50 width) with BNs at
``{1,4,7}``: the same Sequential indices as semseg's ``layer0``. PSPHead's pyramid branches
``psp_modules.{i}.1`` are ConvModules (``conv``, ``bn``), concatenated after the features
in pool-scale order as in semseg; ``bottleneck`` and ``conv_seg`` are semseg's ``cls.0/1``
and ``cls.4``; the auxiliary FCNHead's ``convs.0`` and ``conv_seg`` are ``aux.0/1`` and
``aux.4``. The PSPNet configs contract the first block's dilation and resize with
align_corners=False.
"""

from pspnet_jax.port.layout import NUM_BATCHES_TRACKED, Layout

# PSPHead and the auxiliary FCNHead, whatever the backbone (mmseg_mobilenet_v2 too).
HEAD_RENAMES = (
  (r'^decode_head\.psp_modules\.(\d+)\.1\.conv\.', r'ppm.features.\1.1.'),
  (r'^decode_head\.psp_modules\.(\d+)\.1\.bn\.', r'ppm.features.\1.2.'),
  (r'^decode_head\.bottleneck\.conv\.', 'cls.0.'),
  (r'^decode_head\.bottleneck\.bn\.', 'cls.1.'),
  (r'^decode_head\.conv_seg\.', 'cls.4.'),
  (r'^auxiliary_head\.convs\.0\.conv\.', 'aux.0.'),
  (r'^auxiliary_head\.convs\.0\.bn\.', 'aux.1.'),
  (r'^auxiliary_head\.conv_seg\.', 'aux.4.'),
)
RENAMES = ((r'^backbone\.stem\.', 'layer0.'), (r'^backbone\.(layer[1-4])\.', r'\1.'), *HEAD_RENAMES)


def _recognise(state_dict):
  key = 'backbone.stem.0.weight'
  return key if key in state_dict else None


LAYOUT = Layout(
  name='mmseg',
  description='mmsegmentation PSPNet, ResNetV1c (pspnet_r50-d8_*.pth)',
  renames=RENAMES,
  drops=(NUM_BATCHES_TRACKED,),
  config={'contract_dilation': True, 'align_corners': False},
  backbone_only=False,
  recognise=_recognise,
)
