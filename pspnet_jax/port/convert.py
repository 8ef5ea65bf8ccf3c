"""Checkpoint file -> PSPNet: read, recognise the layout, rename to canonical keys, infer
the config, fill the model strictly. PyTorch files (``.pth``, ``.safetensors``) go through
the layouts of ``LAYOUTS``; the authors' Caffe files (``.caffemodel``) through
``pspnet_jax.port.caffe``, which reads the architecture from the file's layer graph.

``load_torch`` and ``load_caffe`` are the Python entry points, ``python -m pspnet_jax.port``
the CLI (it also writes a model directory, see ``pspnet_jax.checkpoint``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import jax
from flax import nnx

from pspnet_jax import checkpoint
from pspnet_jax.models import PSPNet, PSPNetConfig
from pspnet_jax.port import (
  caffe,
  caffe_format,
  mmcls_mobilenet_v2,
  mmseg,
  mmseg_mobilenet_v2,
  semseg,
  semseg_imagenet,
  torchvision_mobilenet_v2,
  torchvision_resnet,
  torchvision_shufflenet_v2,
)
from pspnet_jax.port.architecture import infer_config
from pspnet_jax.port.layout import HEADS, Layout
from pspnet_jax.port.mapping import PortError, load_state_dict
from pspnet_jax.port.reader import looks_like_torch, read_state_dict

LAYOUTS: dict[str, Layout] = {
  layout.name: layout
  for layout in (
    semseg.LAYOUT,
    semseg_imagenet.LAYOUT,
    mmseg.LAYOUT,
    torchvision_resnet.LAYOUT,
    mmseg_mobilenet_v2.LAYOUT,
    mmcls_mobilenet_v2.LAYOUT,
    torchvision_mobilenet_v2.LAYOUT,
    torchvision_shufflenet_v2.LAYOUT,
  )
}
AUTO = 'auto'
CAFFE = caffe.LAYOUT.name


@dataclasses.dataclass
class Ported:
  """A ported model and what the port did (the CLI prints it, the model directory keeps it)."""

  model: PSPNet
  config: PSPNetConfig
  layout: str
  recognised_by: str | None  # the key ``auto`` recognised the layout by; None if given
  source: str
  read: str  # how the file was read and unwrapped
  dropped: dict[str, list[str]]  # reason -> file keys
  backbone_only: bool
  seed: int | None  # seed of the fresh heads; None when the heads were ported
  fresh_aux: bool = False  # only the aux head is fresh (a file without one: Caffe)
  notes: list[str] = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)  # layout-specific metadata

  def metadata(self) -> dict:
    """Kept in the model directory's config. Flat: training's init_checkpoint reads ``backbone_only`` to
    initialise only the backbone from a backbone-only port."""
    return {
      'ported_from': self.source,
      'layout': self.layout,
      'backbone_only': self.backbone_only,
      'heads_seed': self.seed,
      'fresh_aux': self.fresh_aux,
      'dropped': {why: sorted(keys) for why, keys in self.dropped.items()},
      **self.extra,
    }

  def report(self) -> str:
    how = f'auto-detected from {self.recognised_by}' if self.recognised_by else 'as asked'
    c = self.config
    shown = ('depth', 'stem', 'base_width', 'num_classes', 'contract_dilation', 'align_corners')
    others = ' '.join(
      f'{k}={v}'
      for k, v in c.to_dict().items()
      if k not in shown and v != getattr(PSPNetConfig(), k)
    )
    lines = [
      f'source:  {self.source}',
      f'read:    {self.read}',
      f'layout:  {self.layout} ({how})',
      f'config:  depth={c.depth} stem={c.stem} base_width={c.base_width} '
      f'num_classes={c.num_classes} contract_dilation={c.contract_dilation} '
      f'align_corners={c.align_corners}' + (f' {others}' if others else ''),
    ]
    lines += [f'note:    {n}' for n in self.notes]
    if c.backbone != 'resnet':
      lines[-1] = (
        f'config:  backbone={c.backbone} width_mult={c.width_mult} num_classes={c.num_classes} '
        f'ppm_channels={c.ppm_channels} align_corners={c.align_corners}'
      )
    if self.dropped:
      for why, keys in self.dropped.items():
        shown = ', '.join(sorted(keys)[:3]) + (', ...' if len(keys) > 3 else '')
        lines.append(f'dropped: {len(keys)} x {why}: {shown}')
    else:
      lines.append('dropped: nothing')
    if self.backbone_only:
      lines.append(
        f'heads:   freshly initialised (seed {self.seed}, {c.num_classes} classes): '
        'backbone-only port, train before use'
      )
    elif self.fresh_aux:
      lines.append(
        f'heads:   ppm and cls ported from the checkpoint; aux freshly initialised '
        f'(seed {self.seed}): the file has no auxiliary head (inference never uses it)'
      )
    else:
      lines.append('heads:   ported from the checkpoint')
    return '\n'.join(lines)


def port_checkpoint(
  path: str | os.PathLike,
  layout: str = AUTO,
  num_classes: int | None = None,
  *,
  backbone_only: bool = False,
  seed: int = 0,
  trust_pickle: bool = False,
  prototxt: str | os.PathLike | None = None,
) -> Ported:
  """Ports a ``.pth`` / ``.safetensors`` / ``.caffemodel`` file; see ``load_torch`` and
  ``load_caffe`` for the arguments."""
  source = os.path.abspath(os.fspath(path))
  recognised = _caffe_recognised(source) if layout == AUTO else None
  if layout == CAFFE or recognised:
    return _port_caffe(
      source,
      prototxt,
      num_classes,
      backbone_only=backbone_only,
      seed=seed,
      recognised_by=recognised,
    )
  if prototxt is not None:
    raise PortError(
      f'{source}: a prototxt describes a Caffe net; {source} is not a .caffemodel '
      f'(drop --prototxt, or give --layout {CAFFE})'
    )
  read = read_state_dict(source, trust_pickle=trust_pickle)
  state_dict = read.tensors
  chosen, recognised_by = _choose_layout(state_dict, layout, source)
  backbone_only = backbone_only or chosen.backbone_only
  canonical, file_keys, dropped = chosen.to_canonical(
    state_dict, backbone_only=backbone_only, source=source
  )
  config = infer_config(
    canonical, chosen, with_heads=not backbone_only, num_classes=num_classes, source=source
  )
  model = _fill(
    config,
    canonical,
    file_keys,
    fresh=_HEADS if backbone_only else None,
    seed=seed,
    source=f'{source} ({chosen.name} layout)',
  )
  return Ported(
    model=model,
    config=config,
    layout=chosen.name,
    recognised_by=recognised_by,
    source=source,
    read=read.describe(),
    dropped=dropped,
    backbone_only=backbone_only,
    seed=seed if backbone_only else None,
  )


_HEADS = 'heads'
_AUX = 'aux'


def _fill(
  config: PSPNetConfig, canonical, file_keys, *, fresh: str | None, seed: int, source: str
) -> PSPNet:
  """A model of ``config`` holding ``canonical`` (strictly), with the ``fresh`` part
  (``_HEADS``: ppm, cls and aux; ``_AUX``: aux) initialised as ``create_model`` would."""
  model = checkpoint.abstract_model(config)
  if fresh is not None:
    _initialise(model, seed, fresh)
  load_state_dict(
    model,
    canonical,
    only='backbone' if fresh == _HEADS else None,
    skip='aux' if fresh == _AUX else None,
    source=source,
    source_names=file_keys,
  )
  # The model started abstract: a variable neither the file nor the heads' init filled
  # (a new kind of state in PSPNet, say) would otherwise fail far away, at the forward.
  unfilled = [
    p
    for p, v in nnx.to_flat_state(nnx.state(model))
    if isinstance(v.get_value(), jax.ShapeDtypeStruct)
  ]
  if unfilled:
    raise PortError(
      f'{source}: the port left model variables unset: {unfilled[:5]}; '
      'pspnet_jax.port.mapping does not cover them'
    )
  model.eval()
  return model


def _caffe_recognised(path: str) -> str | None:
  """Why ``auto`` takes ``path`` for a Caffe file, or None."""
  if path.endswith('.caffemodel'):
    return 'its .caffemodel name'
  if (
    os.path.isfile(path) and not looks_like_torch(path) and caffe_format.looks_like_caffemodel(path)
  ):
    return 'its NetParameter header'
  return None


def _port_caffe(
  source: str,
  prototxt,
  num_classes: int | None,
  *,
  backbone_only: bool,
  seed: int,
  recognised_by: str | None,
) -> Ported:
  if os.path.isfile(source) and not caffe_format.looks_like_caffemodel(source):
    with open(source, 'rb') as f:
      head = f.read(4)
    raise PortError(
      f'{source}: not a Caffe .caffemodel (a NetParameter starts with its name, '
      f'inputs or first layer; this file starts with {head!r}); try --layout {AUTO}'
    )
  net = caffe_format.read_caffemodel(source)
  read = caffe.read_net(net)
  if prototxt is not None:
    caffe.check_prototxt(
      net, caffe_format.read_prototxt(prototxt), read, read.config['output_stride']
    )
  canonical, file_keys, dropped = dict(read.canonical), dict(read.file_keys), dict(read.dropped)
  if backbone_only:
    heads = [k for k in canonical if re.search(HEADS[0], k)]
    dropped[HEADS[1]] = sorted({file_keys[k].split(' blob ')[0] for k in heads})
    for k in heads:
      del canonical[k], file_keys[k]
  layout = dataclasses.replace(caffe.LAYOUT, config=read.config)
  config = infer_config(
    canonical,
    layout,
    with_heads=not backbone_only,
    num_classes=num_classes,
    source=source,
    with_aux=False,
  )
  model = _fill(
    config,
    canonical,
    file_keys,
    fresh=_HEADS if backbone_only else _AUX,
    seed=seed,
    source=f'{source} ({CAFFE} layout)',
  )
  counts = collections.Counter(layer.type for layer in net.layers)
  described = ', '.join(f'{n} {t}' for t, n in counts.most_common())
  extra = {
    'caffe': {
      'net': net.name,
      'feature_size': read.feature_size,
      'crop_size': (read.feature_size - 1) * config.output_stride + 1,
      'prototxt': os.path.abspath(os.fspath(prototxt)) if prototxt else None,
    }
  }
  notes = list(read.notes)
  if prototxt is not None:
    notes.append(f'prototxt {os.fspath(prototxt)}: agrees with the file')
  return Ported(
    model=model,
    config=config,
    layout=CAFFE,
    recognised_by=recognised_by,
    source=source,
    read=f'caffemodel, net {net.name!r}: {len(net.layers)} layers ({described})',
    dropped=dropped,
    backbone_only=backbone_only,
    seed=seed,
    fresh_aux=not backbone_only,
    notes=notes,
    extra=extra,
  )


def load_torch(
  path: str | os.PathLike,
  layout: str = AUTO,
  num_classes: int | None = None,
  *,
  backbone_only: bool = False,
  seed: int = 0,
  trust_pickle: bool = False,
) -> tuple[PSPNet, PSPNetConfig]:
  """Loads PyTorch PSPNet / ResNet weights into a PSPNet in eval mode.

  path: a ``.pth`` (needs torch) or ``.safetensors`` (no torch) file in one of the layouts
    ``semseg``, ``semseg-imagenet``, ``mmseg``, ``torchvision`` (ResNet) or
    ``mmseg-mobilenet_v2``, ``mmcls-mobilenet_v2``, ``torchvision-mobilenet_v2``,
    ``torchvision-shufflenet_v2``;
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
  ported = port_checkpoint(
    path, layout, num_classes, backbone_only=backbone_only, seed=seed, trust_pickle=trust_pickle
  )
  return ported.model, ported.config


def load_caffe(
  path: str | os.PathLike,
  prototxt: str | os.PathLike | None = None,
  *,
  num_classes: int | None = None,
  backbone_only: bool = False,
  seed: int = 0,
) -> tuple[PSPNet, PSPNetConfig]:
  """Loads one of the authors' Caffe PSPNet releases (hszhao/PSPNet ``*.caffemodel``) into a
  PSPNet in eval mode that computes what that Caffe net computes.

  path: the binary ``.caffemodel``; read without Caffe (``pspnet_jax.port.caffe_format``).
    The architecture comes from the file's own layers (``pspnet_jax.port.caffe``).
  prototxt: a deploy ``.prototxt`` (``evaluation/prototxt/`` of hszhao/PSPNet) to check the
    file against: the same layers, blobs and parameters, and an input of the size the
    pyramid is sized for. Optional.
  num_classes, backbone_only, seed: as ``load_torch``. The Caffe nets have no auxiliary
    head: ``aux`` is freshly initialised with ``seed`` (inference never runs it).

  Returns ``(model, config)``: ``model(x)`` takes ``x = (rgb - config.mean) / config.std``
  ([B, H, W, 3], RGB 0-255; the Caffe mean, std 1) and returns logits [B, H, W, classes].
  Raises ``PortError`` naming the layer that does not fit.
  """
  ported = port_checkpoint(
    path, CAFFE, num_classes, backbone_only=backbone_only, seed=seed, prototxt=prototxt
  )
  return ported.model, ported.config


def _initialise(model: PSPNet, seed: int, part: str):
  """Gives ``part`` (``_HEADS`` or ``_AUX``) of an abstract ``model`` the values
  ``create_model(config, seed)`` gives.

  Only that part's initialisation is compiled (XLA drops the rest, whose values come from
  the file): PSPNet-50's whole random init takes 4x longer to compile and run.
  """
  where = nnx.Not(nnx.PathContains('backbone')) if part == _HEADS else nnx.PathContains('aux')
  heads = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), where)
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
      raise PortError(
        f'{source}: not a {layout} checkpoint ({seen}; first keys: '
        f'{sorted(state_dict)[:4]}); try --layout {AUTO}'
      )
    return LAYOUTS[layout], None
  if len(recognised) != 1:
    seen = f'several layouts fit: {sorted(recognised)}' if recognised else 'no known layout'
    raise PortError(
      f'{source}: cannot tell the layout ({seen}; first keys: '
      f'{sorted(state_dict)[:4]}); pass one of {sorted(LAYOUTS)} explicitly '
      '(mmseg ResNetV1b or other backbones are not supported)'
    )
  ((name, key),) = recognised.items()
  return LAYOUTS[name], key
