"""semseg PSPNet checkpoints (hszhao/semseg ``train_epoch_N.pth``): the canonical layout.

Saved as ``{'epoch', 'state_dict', 'optimizer'}`` with ``module.`` keys (reader.py unwraps
both); keys are ``layer0..layer4``, ``ppm.features.{i}.{1,2}``, ``cls.{0,1,4}``,
``aux.{0,1,4}``, so nothing is renamed. semseg's deep stem (64-64-128), every block of
layer3/layer4 fully dilated, bilinear resizes with align_corners=True.
"""

from pspnet_jax.port.layout import NUM_BATCHES_TRACKED, Layout


def _recognise(state_dict):
  return 'layer0.0.weight' if 'layer0.0.weight' in state_dict else None


LAYOUT = Layout(
  name='semseg',
  description='semseg PSPNet (train_epoch_N.pth)',
  renames=(),
  drops=(NUM_BATCHES_TRACKED,),
  config={'contract_dilation': False, 'align_corners': True},
  backbone_only=False,
  recognise=_recognise,
)
