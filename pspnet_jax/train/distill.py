"""Knowledge-distillation losses on segmentation logits at the decoder's resolution (before
the final upsampling), student and teacher alike: ``[B, h, w, C]``, float.

- ``channel_wise_divergence``: channel-wise distillation (Shu et al., "Channel-wise
  Knowledge Distillation for Dense Prediction", ICCV 2021), as mmrazor's
  ``ChannelWiseDivergence``: for each image and class channel a softmax over the h*w
  positions of logits / tau, KL(teacher || student) summed over the positions, times tau^2,
  averaged over channels and images.
- ``pixel_kl``: the pixel-wise term (Hinton et al. 2015; Liu et al., "Structured Knowledge
  Distillation for Semantic Segmentation", CVPR 2019): at each position a softmax over the
  classes of logits / tau, KL(teacher || student), times tau^2, averaged over the positions
  ``mask`` keeps (the labelled ones).

The teacher's logits carry no gradient (``stop_gradient``); computations are float32.

``Distillation`` (built by ``from_config`` from ``config.distill``) is what the train step
(``pspnet_jax.train.step``) needs of a teacher: its graph and variables, frozen, run in
inference mode on the student's augmented batch under its own normalisation, and the loss
that compares the two. The variables ride in the train state under ``teacher``, so they
are sharded like the student's and compiled into the same step, but they are neither
differentiated nor given optimizer state nor written to checkpoints (``pspnet_jax.train.
loop`` saves ``params`` and ``batch_stats`` only). ``check_teacher`` refuses to resume a
workdir with another teacher than the one it records (by the SHA-256 of its weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax import ops, output_dir
from pspnet_jax.errors import UserError
from pspnet_jax.models import PSPNetConfig

LOSSES = ('cwd', 'kl')
RECORD = 'teacher.json'  # in the workdir: which teacher its checkpoints were trained with


def _kl(teacher_logits, student_logits, axis):
  log_t = jax.nn.log_softmax(teacher_logits, axis=axis)
  log_s = jax.nn.log_softmax(student_logits, axis=axis)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=axis)


def channel_wise_divergence(student, teacher, tau: float = 1.0):
  """Scalar CWD loss; ``student``, ``teacher``: [B, h, w, C] logits of the same shape."""
  if student.shape != teacher.shape:
    raise ValueError(f'student {student.shape} and teacher {teacher.shape} logits differ in shape')
  b, h, w, c = student.shape
  s = student.astype(jnp.float32).reshape(b, h * w, c) / tau
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32).reshape(b, h * w, c) / tau
  return tau**2 * jnp.mean(_kl(t, s, axis=1))  # [B, C] -> mean over images and channels


def pixel_kl(student, teacher, mask=None, tau: float = 1.0):
  """Scalar pixel-wise KL; ``mask``: [B, h, w] bool, the positions that count (all if
  None); 0 when none does."""
  if student.shape != teacher.shape:
    raise ValueError(f'student {student.shape} and teacher {teacher.shape} logits differ in shape')
  s = student.astype(jnp.float32) / tau
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32) / tau
  kl = _kl(t, s, axis=-1)  # [B, h, w]
  if mask is None:
    return tau**2 * jnp.mean(kl)
  mask = mask.astype(jnp.float32)
  return tau**2 * jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def labels_at(labels, size: tuple[int, int], align_corners: bool):
  """The labels [B, H, W] at the positions the logits of ``size`` (h, w) sit on: on each
  axis the nearer of the two samples that resizing the labels to ``size`` with the model's
  ``align_corners`` would read (``ops.linear_taps``, the model's own resize grid)."""

  def nearest(n_in, n_out):
    i0, i1, w0, w1 = ops.linear_taps(n_in, n_out, align_corners)
    return np.where(np.asarray(w0) >= np.asarray(w1), np.asarray(i0), np.asarray(i1))

  h, w = size
  return labels[:, nearest(labels.shape[1], h)][:, :, nearest(labels.shape[2], w)]


@dataclasses.dataclass(frozen=True)
class Distillation:
  """A frozen teacher and the loss it teaches with (``config.distill``).

  ``variables``: ``{'params', 'batch_stats'}`` nnx States of the teacher, arrays or (for
  ahead-of-time compilation) ShapeDtypeStructs; ``sha256`` identifies the weights. The train
  state takes these arrays over (``Trainer.initial_state``) and the step donates them with
  it: after a step read the teacher from ``state['teacher']``, not from here.
  """

  graphdef: nnx.GraphDef
  variables: dict
  config: PSPNetConfig  # the teacher's, in the student's compute dtype
  student_mean: tuple
  student_std: tuple
  path: str
  sha256: str
  loss: str
  tau: float
  weight: float
  aux: bool

  def teacher_outputs(self, variables, images, size):
    """The teacher's (logits, aux logits or None) at ``size`` (the student's head
    resolution) for the student's normalised ``images``, without gradient."""
    t_mean, t_std = self.config.mean, self.config.std
    if (t_mean, t_std) != (self.student_mean, self.student_std):
      rgb = images * jnp.asarray(self.student_std) + jnp.asarray(self.student_mean)
      images = (rgb - jnp.asarray(t_mean)) / jnp.asarray(t_std)
    teacher = nnx.merge(self.graphdef, variables['params'], variables['batch_stats'])
    teacher.eval()
    out = teacher(images, upsample=False, aux=self.aux)
    logits, aux = out if self.aux else (out, None)

    def fit(z):
      if z is None:
        return None
      if z.shape[1:3] != tuple(size):  # another output stride than the student's
        z = ops.resize_bilinear(z, size, self.config.align_corners)
      return jax.lax.stop_gradient(z)

    return fit(logits), fit(aux)

  def term(self, student, teacher, labels, ignore_label: int, align_corners: bool):
    """``weight`` x the loss between one head's student and teacher logits [B, h, w, C];
    ``kl`` counts the positions whose nearest label (``labels_at``) is not ignored."""
    if self.loss == 'cwd':
      value = channel_wise_divergence(student, teacher, self.tau)
    else:
      mask = labels_at(labels, student.shape[1:3], align_corners) != ignore_label
      value = pixel_kl(student, teacher, mask, self.tau)
    return self.weight * value


def weights_sha256(variables) -> str:
  """SHA-256 over the teacher's variables: their paths, dtypes, shapes and bytes, in order."""
  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(
    nnx.to_pure_dict(nnx.merge_state(*variables.values()))
  )
  for path, leaf in sorted(flat[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.asarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def from_config(config, student: PSPNetConfig, *, abstract: bool = False):
  """The ``Distillation`` of ``config.distill`` for a student of config ``student``, or
  None when ``config.distill.teacher`` is empty. ``abstract``: the teacher's shapes only
  (its ``model_config.json`` is read, not its weights), for ahead-of-time compilation."""
  d = config.distill
  if not d.teacher:
    return None
  if d.loss not in LOSSES:
    raise UserError(
      f'config key distill.loss={d.loss!r}: give one of {", ".join(LOSSES)} '
      '(--config.distill.loss=cwd)'
    )
  path = os.path.abspath(os.path.expanduser(d.teacher))
  if not os.path.isdir(path):
    raise UserError(
      f'distill.teacher {path}: no such directory (give a model directory, a training '
      'workdir or one of its checkpoints/<step>)'
    )
  t_config = ckpt_lib.model_config(path)
  if t_config.num_classes != student.num_classes:
    raise UserError(
      f'distill.teacher {path} predicts {t_config.num_classes} classes but the student has '
      f'{student.num_classes}: a teacher must be trained on the same classes'
    )
  t_config = dataclasses.replace(t_config, dtype=student.dtype)
  model = ckpt_lib.abstract_model(t_config)
  if not abstract:
    nnx.update(model, nnx.state(ckpt_lib.load_model(path)))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  variables = {'params': params, 'batch_stats': batch_stats}
  return Distillation(
    graphdef=graphdef,
    variables=variables,
    config=t_config,
    student_mean=tuple(student.mean),
    student_std=tuple(student.std),
    path=path,
    sha256='' if abstract else weights_sha256(variables),
    loss=d.loss,
    tau=float(d.tau),
    weight=float(d.weight),
    aux=bool(d.aux),
  )


def check_teacher(workdir: str, distillation: Distillation | None, resuming: bool) -> None:
  """Refuses to resume ``workdir`` with another teacher than its record (or with a teacher
  when it was trained without one, or the reverse); else records this run's teacher."""
  record_path = os.path.join(workdir, RECORD)
  recorded = None
  if os.path.exists(record_path):
    with open(record_path) as f:
      recorded = json.load(f)
  if resuming:
    flag = '--config.distill.teacher'
    if recorded and distillation is None:
      raise UserError(
        f'{workdir} was trained with distill.teacher={recorded["path"]}: resume with '
        f'{flag}={recorded["path"]} (the same weights), or give a new --workdir'
      )
    if distillation is not None and not recorded:
      raise UserError(
        f'{workdir} was trained without a teacher: resume without {flag}, or give a new '
        '--workdir to distil'
      )
    if distillation is not None and recorded['sha256'] != distillation.sha256:
      raise UserError(
        f'distill.teacher {distillation.path}: its weights (SHA-256 '
        f'{distillation.sha256[:12]}...) are not those {workdir} was trained with '
        f'({recorded["path"]}, {recorded["sha256"][:12]}...): resume with that teacher, or '
        'give a new --workdir'
      )
  if jax.process_index() != 0:
    return
  if distillation is None:
    if recorded:  # a record without checkpoints: of a run that never saved a step
      os.remove(record_path)
    return
  record = {
    'path': distillation.path,
    'sha256': distillation.sha256,
    'loss': distillation.loss,
    'tau': distillation.tau,
    'weight': distillation.weight,
    'aux': distillation.aux,
  }
  os.makedirs(workdir, exist_ok=True)
  with output_dir.atomic(record_path) as tmp, open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
