"""semseg's training loss: cross entropy over non-ignored pixels of the logits resized
bilinearly to the label's size, computed at the logits' own resolution.

``cross_entropy`` is PyTorch's ``CrossEntropyLoss(ignore_index=...)`` on full-resolution
logits. ``upsampled_cross_entropy(z, labels, align_corners=...)`` is
``cross_entropy(resize_bilinear(z, labels' size, align_corners), labels)`` without ever
holding the full-resolution float32 logits, probabilities or their gradient: bilinear
resizing is linear and separable, ``up(z)[c] = U_h z[c] U_w^T`` with the interpolation
matrices of ``ops.interpolation_matrix``. The loss walks the output ``block_rows`` rows at
a time (a ``lax.scan``): a block's logits are two small matmuls (the block's few input rows
through its slice of ``U_h``, then ``U_w``), reduced at once to the block's log-sum-exp and
label logits. Its gradient with respect to ``z`` (a ``jax.custom_vjp``) is
``U_h^T (softmax(up(z)) - onehot) U_w``, accumulated block by block from the same
recomputed block logits and the saved per-pixel log-sum-exp ([B, H, W] float32).

On an accelerator the composition of a gather-based resize with the loss keeps several
full-resolution float32 arrays of ``B x H x W x classes`` in HBM (the upsampled logits, the
log-probabilities saved for the backward pass, their gradient); here one block at a time
exists, and the matmuls run on the matrix units.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pspnet_jax import ops

HIGHEST = jax.lax.Precision.HIGHEST


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """PyTorch ``CrossEntropyLoss(ignore_index=...)``: mean over non-ignored pixels.

  logits: [B, H, W, C] float32, labels: [B, H, W] int -> scalar float32.
  """
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def upsampled_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  *,
  align_corners: bool,
  ignore_label: int = 255,
  block_rows: int = 32,
) -> jax.Array:
  """``cross_entropy(resize_bilinear(logits, labels.shape[1:], align_corners), labels)``.

  logits: [B, h, w, C] (any float dtype; the loss is computed in float32), labels:
  [B, H, W] int -> scalar float32. ``block_rows``: output rows per step of the loop (any
  positive number; the last block is padded with ignored rows); 0 computes the composition
  itself, at full resolution (for comparison: ``benchmarks/loss.py``). Equal to the
  composition to float32 rounding (the interpolation's two taps are summed by a matmul).
  """
  if block_rows < 0:
    raise ValueError(
      f'block_rows must be >= 0 (0: the full-resolution composition), got {block_rows}'
    )
  out_h, out_w = labels.shape[1:]
  if block_rows == 0:
    full = ops.resize_bilinear(logits.astype(jnp.float32), (out_h, out_w), align_corners)
    return cross_entropy(full, labels, ignore_label)
  b, h, w, c = logits.shape
  plan = _plan(h, w, out_h, out_w, bool(align_corners), min(int(block_rows), out_h))
  valid = labels != ignore_label
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  pad = plan.blocks * plan.rows - out_h
  labels = jnp.pad(jnp.where(valid, labels, -1), ((0, 0), (0, pad), (0, 0)), constant_values=-1)
  labels = labels.reshape(b, plan.blocks, plan.rows, out_w).transpose(1, 0, 2, 3).astype(jnp.int32)
  return _nll_sum(logits.astype(jnp.float32), labels, plan) / count


class _Plan:
  """Static per-block slices of the interpolation: block ``k`` covers output rows
  ``[k * rows, (k + 1) * rows)``, which read input rows ``[starts[k], starts[k] + span)``
  through ``rows_matrix[k]`` ([rows, span]); ``cols_matrix`` is the whole [out_w, w].
  Built once per shape (``_plan``); hashed by identity, as ``custom_vjp`` wants of it."""

  def __init__(self, h, w, out_h, out_w, align_corners, rows):
    u_h = ops.interpolation_matrix(h, out_h, align_corners)  # [out_h, h]
    self.rows, self.blocks = rows, math.ceil(out_h / rows)
    u_h = np.concatenate([u_h, np.zeros((self.blocks * rows - out_h, h), np.float32)])
    reads = [np.nonzero(u_h[k * rows : (k + 1) * rows].any(axis=0))[0] for k in range(self.blocks)]
    self.span = max((r[-1] - r[0] + 1 for r in reads if r.size), default=1)
    self.starts = np.array(
      [min(int(r[0]) if r.size else 0, h - self.span) for r in reads], np.int32
    )
    self.rows_matrix = np.stack(
      [u_h[k * rows : (k + 1) * rows, s : s + self.span] for k, s in enumerate(self.starts)]
    )
    self.cols_matrix = ops.interpolation_matrix(w, out_w, align_corners)


@functools.lru_cache(maxsize=64)
def _plan(h, w, out_h, out_w, align_corners, rows) -> _Plan:
  return _Plan(h, w, out_h, out_w, align_corners, rows)


def _block_logits(z, start, rows_matrix, cols_matrix, span):
  """The block's full-resolution logits [B, rows, out_w, C] float32."""
  zb = jax.lax.dynamic_slice_in_dim(z, start, span, axis=1)
  y = jnp.einsum('rs,bswc->brwc', rows_matrix, zb, precision=HIGHEST)
  return jnp.einsum('xw,brwc->brxc', cols_matrix, y, precision=HIGHEST)


def _scan_inputs(plan: _Plan, labels):
  return (jnp.asarray(plan.starts), jnp.asarray(plan.rows_matrix), labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nll_sum(z, labels, plan):
  return _nll_sum_fwd(z, labels, plan)[0]


def _nll_sum_fwd(z, labels, plan):
  """z: [B, h, w, C] float32; labels: [blocks, B, rows, out_w] int32, -1 where ignored."""
  cols = jnp.asarray(plan.cols_matrix)

  def body(total, xs):
    start, rows_matrix, lab = xs
    y = _block_logits(z, start, rows_matrix, cols, plan.span)
    lse = jax.nn.logsumexp(y, axis=-1)
    picked = jnp.take_along_axis(y, jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0]
    return total + jnp.sum(jnp.where(lab >= 0, lse - picked, 0.0)), lse

  total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32), _scan_inputs(plan, labels))
  return total, (z, labels, lse)


def _nll_sum_bwd(plan, residuals, g):
  z, labels, lse = residuals
  cols = jnp.asarray(plan.cols_matrix)

  def body(dz, xs):
    (start, rows_matrix, lab), block_lse = xs[:3], xs[3]
    y = _block_logits(z, start, rows_matrix, cols, plan.span)
    onehot = jax.nn.one_hot(lab, y.shape[-1], dtype=y.dtype)  # all zero where lab = -1
    dy = (jnp.exp(y - block_lse[..., None]) * (lab >= 0)[..., None] - onehot) * g
    t = jnp.einsum('xw,brxc->brwc', cols, dy, precision=HIGHEST)
    dzb = jnp.einsum('rs,brwc->bswc', rows_matrix, t, precision=HIGHEST)
    old = jax.lax.dynamic_slice_in_dim(dz, start, plan.span, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(dz, old + dzb, start, axis=1), None

  dz, _ = jax.lax.scan(body, jnp.zeros_like(z), (*_scan_inputs(plan, labels), lse))
  return dz, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
