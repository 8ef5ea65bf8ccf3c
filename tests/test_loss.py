"""The loss at the logits' own resolution (``upsampled_cross_entropy``) against the plain
composition (resize to the label's size, then cross entropy) and against PyTorch's
``F.interpolate(..., mode='bilinear')`` + ``CrossEntropyLoss(ignore_index=255)``: the loss
and its gradient with respect to the low-resolution logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pspnet_jax import ops
from pspnet_jax.train import cross_entropy, upsampled_cross_entropy

# (batch, h, w, classes, H, W, block_rows, align_corners): odd sizes, blocks that do not
# divide the height, a single block, one-row blocks, both corner conventions.
CASES = [
  (2, 7, 9, 5, 25, 33, 4, True),
  (2, 7, 9, 5, 25, 33, 7, False),
  (1, 13, 11, 3, 97, 81, 64, True),
  (2, 8, 8, 4, 57, 57, 1, True),
  (1, 6, 5, 6, 41, 37, 100, False),
]


def _data(b, h, w, c, out_h, out_w, seed=0):
  rng = np.random.default_rng(seed)
  z = (rng.standard_normal((b, h, w, c)) * 3).astype(np.float32)
  labels = rng.integers(0, c, (b, out_h, out_w))
  labels[rng.random(labels.shape) < 0.2] = 255
  labels[0, :3] = 255  # whole ignored rows, some in the first block
  return z, labels


def _fused(labels, ac, rows):
  return jax.jit(
    jax.value_and_grad(
      lambda z: upsampled_cross_entropy(z, jnp.asarray(labels), align_corners=ac, block_rows=rows)
    )
  )


@pytest.mark.parametrize('b,h,w,c,out_h,out_w,rows,ac', CASES)
def test_equals_the_composition_in_float32(b, h, w, c, out_h, out_w, rows, ac):
  z, labels = _data(b, h, w, c, out_h, out_w)
  plain = jax.value_and_grad(
    lambda z: cross_entropy(ops.resize_bilinear(z, (out_h, out_w), ac), jnp.asarray(labels))
  )
  (l0, g0), (l1, g1) = plain(jnp.asarray(z)), _fused(labels, ac, rows)(jnp.asarray(z))
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  np.testing.assert_allclose(
    np.asarray(g1), np.asarray(g0), rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(g0)))
  )


@pytest.mark.parity
@pytest.mark.parametrize('b,h,w,c,out_h,out_w,rows,ac', CASES)
def test_equals_torch_interpolate_and_cross_entropy(b, h, w, c, out_h, out_w, rows, ac):
  z, labels = _data(b, h, w, c, out_h, out_w, seed=1)
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  up = torch.nn.functional.interpolate(zt, size=(out_h, out_w), mode='bilinear', align_corners=ac)
  want = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels), ignore_index=255)
  want.backward()
  want_grad = zt.grad.numpy().transpose(0, 2, 3, 1)
  loss, grad = _fused(labels, ac, rows)(jnp.asarray(z))
  assert float(loss) == pytest.approx(want.item(), rel=1e-6)
  np.testing.assert_allclose(
    np.asarray(grad), want_grad, rtol=0, atol=1e-6 * np.abs(want_grad).max()
  )


def test_every_pixel_ignored_is_zero_loss_and_gradient():
  z, labels = _data(1, 5, 5, 3, 17, 17)
  loss, grad = _fused(np.full_like(labels, 255), True, 4)(jnp.asarray(z))
  assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_bfloat16_logits_are_taken_in_float32():
  z, labels = _data(1, 6, 6, 4, 21, 21)
  zb = jnp.asarray(z, jnp.bfloat16)
  got = upsampled_cross_entropy(zb, jnp.asarray(labels), align_corners=True, block_rows=8)
  want = cross_entropy(
    ops.resize_bilinear(zb.astype(jnp.float32), (21, 21), True), jnp.asarray(labels)
  )
  assert got.dtype == jnp.float32 and float(got) == pytest.approx(float(want), rel=1e-6)


def test_no_full_resolution_array_in_the_program():
  """The compiled loss and gradient hold no [B, H, W, C] array: one block at a time."""
  b, h, c, out = 2, 12, 16, 89
  z, labels = _data(b, h, h, c, out, out)
  text = _fused(labels, True, 8).lower(jnp.asarray(z)).compile().as_text()
  assert f'[{b},{out},{out},{c}]' not in text.replace(' ', '')
  assert f'[{b},8,{out},{c}]' in text.replace(' ', '')


def test_block_rows_zero_is_the_composition_and_negative_is_refused():
  z, labels = _data(1, 4, 4, 2, 9, 9)
  z, labels = jnp.asarray(z), jnp.asarray(labels)
  plain = cross_entropy(ops.resize_bilinear(z, (9, 9), True), labels)
  assert float(upsampled_cross_entropy(z, labels, align_corners=True, block_rows=0)) == float(plain)
  with pytest.raises(ValueError, match='block_rows'):
    upsampled_cross_entropy(z, labels, align_corners=True, block_rows=-1)


def test_a_negative_config_value_is_one_clear_error():
  from pspnet_jax.errors import UserError
  from pspnet_jax.train import make_train_step

  with pytest.raises(UserError, match=r'config.loss_block_rows=-2: expected .* >= 1 \(or 0'):
    make_train_step(None, None, aux_weight=0.4, ignore_label=255, loss_block_rows=-2)
