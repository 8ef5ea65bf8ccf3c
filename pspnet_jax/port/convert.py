"""PyTorch checkpoint file -> PSPNet: read, recognise the layout, rename to canonical keys,
infer the config, fill the model strictly.

``load_torch`` is the Python entry point, ``python -m pspnet_jax.port`` the CLI (it also
writes a model directory, see ``pspnet_jax.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.port import mmseg, semseg, semseg_imagenet, torchvision_resnet
from pspnet_jax.port import mmcls_mobilenet_v2, mmseg_mobilenet_v2, torchvision_mobilenet_v2
from pspnet_jax.port.architecture import infer_config
from pspnet_jax.port.layout import Layout
from pspnet_jax.port.mapping import PortError, load_state_dict
from pspnet_jax.port.reader import read_state_dict

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (semseg.LAYOUT, semseg_imagenet.LAYOUT, mmseg.LAYOUT, torchvision_resnet.LAYOUT,
                   mmseg_mobilenet_v2.LAYOUT, mmcls_mobilenet_v2.LAYOUT,
                   torchvision_mobilenet_v2.LAYOUT)}
AUTO = 'auto'


@dataclasses.dataclass
class Ported:
  """A ported model and what the port did (the CLI prints it, the model directory keeps it)."""
  model: PSPNet
  config: PSPNetConfig
  layout: str
  recognised_by: str | None   # the key ``auto`` recognised the layout by; None if given
  source: str
  read: str                    # how the file was read and unwrapped
  dropped: dict[str, list[str]]  # reason -> file keys
  backbone_only: bool
  seed: int | None             # seed of the fresh heads; None when the heads were ported

  def metadata(self) -> dict:
    """Kept in the model directory's config. Flat: training's init_checkpoint reads ``backbone_only`` to
    initialise only the backbone from a backbone-only port."""
    return {'ported_from': self.source, 'layout': self.layout,
            'backbone_only': self.backbone_only, 'heads_seed': self.seed,
            'dropped': {why: sorted(keys) for why, keys in self.dropped.items()}}

  def report(self) -> str:
    how = f'auto-detected from {self.recognised_by}' if self.recognised_by else 'as asked'
    c = self.config
    lines = [f'source:  {self.source}',
             f'read:    {self.read}',
             f'layout:  {self.layout} ({how})',
             f'config:  depth={c.depth} stem={c.stem} base_width={c.base_width} '
             f'num_classes={c.num_classes} contract_dilation={c.contract_dilation} '
             f'align_corners={c.align_corners}']
    if c.backbone != 'resnet':
      lines[-1] = (f'config:  backbone={c.backbone} num_classes={c.num_classes} '
                   f'ppm_channels={c.ppm_channels} align_corners={c.align_corners}')
    if self.dropped:
      for why, keys in self.dropped.items():
        shown = ', '.join(sorted(keys)[:3]) + (', ...' if len(keys) > 3 else '')
        lines.append(f'dropped: {len(keys)} x {why}: {shown}')
    else:
      lines.append('dropped: nothing')
    if self.backbone_only:
      lines.append(f'heads:   freshly initialised (seed {self.seed}, {c.num_classes} classes): '
                   'backbone-only port, train before use')
    else:
      lines.append('heads:   ported from the checkpoint')
    return '\n'.join(lines)


def port_checkpoint(path: str | os.PathLike, layout: str = AUTO, num_classes: int | None = None, *,
                    backbone_only: bool = False, seed: int = 0,
                    trust_pickle: bool = False) -> Ported:
  """Ports a ``.pth`` / ``.safetensors`` file; see ``load_torch`` for the arguments."""
  source = os.path.abspath(os.fspath(path))
  read = read_state_dict(source, trust_pickle=trust_pickle)
  state_dict = read.tensors
  chosen, recognised_by = _choose_layout(state_dict, layout, source)
  backbone_only = backbone_only or chosen.backbone_only
  canonical, file_keys, dropped = chosen.to_canonical(state_dict, backbone_only=backbone_only,
                                                      source=source)
  config = infer_config(canonical, chosen, with_heads=not backbone_only, num_classes=num_classes,
                        source=source)
  model = checkpoint.abstract_model(config)
  if backbone_only:
    _initialise_heads(model, seed)
  load_state_dict(model, canonical, only='backbone' if backbone_only else None,
                  source=f'{source} ({chosen.name} layout)', source_names=file_keys)
  # The model started abstract: a variable neither the file nor the heads' init filled
  # (a new kind of state in PSPNet, say) would otherwise fail far away, at the forward.
  unfilled = [p for p, v in nnx.to_flat_state(nnx.state(model))
              if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if unfilled:
    raise PortError(f'{source}: the port left model variables unset: {unfilled[:5]}; '
                    'pspnet_jax.port.mapping does not cover them')
  model.eval()
  return Ported(model=model, config=config, layout=chosen.name, recognised_by=recognised_by,
                source=source, read=read.describe(), dropped=dropped, backbone_only=backbone_only,
                seed=seed if backbone_only else None)


def load_torch(path: str | os.PathLike, layout: str = AUTO, num_classes: int | None = None, *,
               backbone_only: bool = False, seed: int = 0,
               trust_pickle: bool = False) -> tuple[PSPNet, PSPNetConfig]:
  """Loads PyTorch PSPNet / ResNet weights into a PSPNet in eval mode.

  path: a ``.pth`` (needs torch) or ``.safetensors`` (no torch) file in one of the layouts
    ``semseg``, ``semseg-imagenet``, ``mmseg``, ``torchvision`` (ResNet) or
    ``mmseg-mobilenet_v2``, ``mmcls-mobilenet_v2``, ``torchvision-mobilenet_v2``;
    ``layout='auto'`` recognises it from its keys.
  num_classes: checked against the checkpoint's classifier (a conflict is an error); for
    backbone-only ports it sets the fresh heads' classes (default 150).
  backbone_only: port only the backbone of a full PSPNet checkpoint and initialise fresh
    heads with ``seed`` (always so for the ImageNet layouts, which hold no heads).
  trust_pickle: allow ``.pth`` files that hold arbitrary Python objects (runs their code).

  Returns ``(model, config)``: ``model(x)`` maps ``x: [B, H, W, 3] float32`` (normalised
  image) to logits ``[B, H, W, num_classes]``; ``model.backbone(x)[-1]`` is layer4.
  Raises ``PortError`` (``StateDictMismatch`` lists every missing, unexpected and mis-shaped
  key with both shapes).
  """
  ported = port_checkpoint(path, layout, num_classes, backbone_only=backbone_only, seed=seed,
                           trust_pickle=trust_pickle)
  return ported.model, ported.config


def _initialise_heads(model: PSPNet, seed: int):
  """Gives the heads of an abstract ``model`` the values ``create_model(config, seed)`` gives.

  Only the heads' initialisation is compiled (XLA drops the rest, whose values come from
  the file): PSPNet-50's whole random init takes 4x longer to compile and run.
  """
  heads = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Not(nnx.PathContains('backbone')))
  config = model.config
  fresh = jax.jit(lambda: nnx.to_pure_dict(nnx.state(PSPNet(config, rngs=nnx.Rngs(seed)), heads)))()
  state = nnx.state(model, heads)
  nnx.replace_by_pure_dict(state, fresh)
  nnx.update(model, state)


def _choose_layout(state_dict, layout: str, source: str) -> tuple[Layout, str | None]:
  recognised = {name: key for name, lay in LAYOUTS.items() if (key := lay.recognise(state_dict))}
  if layout != AUTO:
    if layout not in LAYOUTS:
      raise PortError(f'unknown layout {layout!r}; expected {AUTO} or one of {sorted(LAYOUTS)}')
    if layout not in recognised:
      seen = f'it looks like {sorted(recognised)}' if recognised else 'no layout recognises it'
      raise PortError(f'{source}: not a {layout} checkpoint ({seen}; first keys: '
                      f'{sorted(state_dict)[:4]}); try --layout {AUTO}')
    return LAYOUTS[layout], None
  if len(recognised) != 1:
    seen = f'several layouts fit: {sorted(recognised)}' if recognised else 'no known layout'
    raise PortError(f'{source}: cannot tell the layout ({seen}; first keys: '
                    f'{sorted(state_dict)[:4]}); pass one of {sorted(LAYOUTS)} explicitly '
                    '(mmseg ResNetV1b or other backbones are not supported)')
  (name, key), = recognised.items()
  return LAYOUTS[name], key
