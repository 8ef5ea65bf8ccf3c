"""The model a run starts from: fresh, or initialised from a ported model directory
(``config.init_checkpoint``): a full PSPNet with the same architecture, or a backbone-only
one (ImageNet weights) whose new layers stay freshly initialised."""

from __future__ import annotations

import os

from flax import nnx

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax.errors import UserError
from pspnet_jax.models import PSPNet, PSPNetConfig

# What the backbone's weights fix: a backbone-only init must agree on these.
BACKBONE_FIELDS = (
  'backbone',
  'width_mult',
  'depth',
  'stem',
  'base_width',
  'output_stride',
  'contract_dilation',
  'stride_in_1x1',
  'ceil_mode',
  'mean',
  'std',
)


def model_config_from(config, num_classes: int) -> PSPNetConfig:
  """``config.model`` with the dataset's classes.

  A ``PSPNetConfig`` field that ``config.model`` does not list (the input normalisation
  ``mean`` / ``std``, the Caffe architecture fields) comes from ``config.init_checkpoint``'s
  config when there is one: the weights fix it. Otherwise it keeps its default (semseg's).
  """
  fields = dict(config.model)
  fields['num_classes'] = num_classes
  path = config.init_checkpoint
  if path:
    for key, value in ckpt_lib.model_config(path).to_dict().items():
      fields.setdefault(key, value)
  return PSPNetConfig.from_dict(fields)


def initial_model(config, model_config: PSPNetConfig) -> PSPNet:
  """A fresh model, optionally initialised from a ported checkpoint (``config.init_checkpoint``).

  A full checkpoint must have the same architecture, classes included; a backbone-only
  one (ImageNet weights, or any checkpoint with ``config.init_backbone_only``) fills the
  backbone and leaves the pyramid pooling and both heads freshly initialised, and says so.
  """
  path = config.init_checkpoint
  if not path:
    return ckpt_lib.create_model(model_config, seed=config.seed)
  source = ckpt_lib.load_model(path)
  src_cfg, dst_cfg = source.config, model_config
  _, meta = (
    ckpt_lib.read_model_config(path)
    if os.path.exists(os.path.join(path, ckpt_lib.MODEL_CONFIG))
    else (None, {})
  )
  backbone_only = bool(meta.get('backbone_only')) or bool(config.init_backbone_only)
  if not backbone_only and src_cfg.num_classes != dst_cfg.num_classes:
    raise UserError(
      f'init_checkpoint {path} predicts {src_cfg.num_classes} classes but the dataset has '
      f'{dst_cfg.num_classes} (set --config.init_backbone_only=True to take only its backbone '
      'and train fresh pyramid pooling and heads)'
    )
  arch = lambda c: {
    k: v for k, v in c.to_dict().items() if k not in ('num_classes', 'dtype', 'dropout')
  }
  if backbone_only:
    keys = BACKBONE_FIELDS
    diff = {
      k: (getattr(src_cfg, k), getattr(dst_cfg, k))
      for k in keys
      if getattr(src_cfg, k) != getattr(dst_cfg, k)
    }
    if diff:
      raise UserError(f'init_checkpoint {path}: backbone differs from config.model: {diff}')
    model = ckpt_lib.create_model(model_config, seed=config.seed)
    nnx.update(model.backbone, nnx.state(source.backbone))
    print(
      f'init_checkpoint {path}: backbone ({dst_cfg.backbone}) taken from it; ppm, cls and aux '
      f'freshly initialised (seed {config.seed}) for {dst_cfg.num_classes} classes',
      flush=True,
    )
    return model
  if arch(src_cfg) != arch(dst_cfg):
    raise UserError(
      f'init_checkpoint {path}: architecture {arch(src_cfg)} differs from '
      f'config.model {arch(dst_cfg)}'
    )
  # Every variable comes from the checkpoint: fill an abstract model (no initialisation
  # compile) built from this config, so its dtype and dropout are the config's.
  model = ckpt_lib.abstract_model(model_config)
  nnx.update(model, nnx.state(source))
  return model
