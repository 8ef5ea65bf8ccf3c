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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
