"""Sliding-window, multi-scale and flip evaluation (semseg's test protocol), compiled.

The protocol (``tool/test.py`` of the authors' semseg, github.com/hszhao/semseg at commit
4f274c3f), for an
image of size ``h x w`` and each scale ``s``:

1. resize the image bilinearly (OpenCV ``INTER_LINEAR``: half-pixel centres, no
   antialiasing, i.e. ``align_corners=False``) so its long side is ``round(s * base_size)``
   and its short side ``round(long / h_or_w * short)`` (Python's ``round``, half to even);
2. pad it to at least ``crop x crop``, centred (``floor(pad / 2)`` before, the rest after),
   with the mean colour, which is zero after normalisation (with the model's own mean and
   std, ``PSPNetConfig.mean`` / ``.std``);
3. slide a ``crop x crop`` window with stride ``ceil(crop * stride_rate)``: window ``i`` of
   ``ceil((size - crop) / stride) + 1`` starts at ``min(i * stride + crop, size) - crop``;
4. for each window, the softmax of the network's logits (at window size) averaged with the
   softmax of its horizontally flipped twin, flipped back;
5. sum the windows' probabilities and divide by the per-pixel window count;
6. crop the padding away and resize the probabilities bilinearly to ``h x w``
   (``cv2.resize(..., INTER_LINEAR)`` again: ``align_corners=False``, whatever the model's
   own ``align_corners``, which only governs resizes inside the network). Both resizes
   here use OpenCV's sampling coordinates (``ops.linear_taps(..., convention='opencv')``);
7. average over scales; argmax.

How it is compiled. Everything that depends on the image's exact size is data: resize taps
(two source indices and weights per output row/column), window offsets, the number of
windows. Shapes depend only on a *bucket*: the image is padded to ``bucket_multiple``
multiples (``[Hb, Wb]``), and per scale the canvas is ``P x P`` with
``P = max(round(s * base_size), crop)`` (the long side is fixed by the protocol, so every
padded resized image fits), holding at most ``g * g`` windows. One program per bucket then
runs all scales; inside it, windows go through the network ``window_batch`` at a time (with
their flips, a batch of ``2 * window_batch``) in a ``fori_loop`` whose trip count is the
image's own number of windows, so no network time is spent on absent windows. Compilations
are bounded by the number of distinct buckets, never by the number of images.

'whole' mode runs the whole resized image in one forward, per scale: the canvas is the
resized image padded (centred, mean) to a multiple of ``whole_multiple`` on its short side
(its long side is exactly ``round(s * base_size)``); ``whole_multiple=1`` is unpadded
whole-image inference, at one compilation per distinct resized shape (the canvas shapes are
part of the bucket, ``Evaluator.bucket``). A slide-mode run
whose single window covers that canvas computes the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pspnet_jax import config_file, ops
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation import metrics
from pspnet_jax.models import PSPNet

SINGLE_SCALE = (1.0,)
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # semseg's multi-scale test


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The test protocol. Defaults: semseg's ADE20K/VOC single-scale test (+flip)."""

  mode: str = 'slide'  # 'slide' (semseg) | 'whole'
  scales: tuple[float, ...] = SINGLE_SCALE
  flip: bool = True  # semseg's default: single-scale numbers include flip
  crop_size: int = 473  # window side ('slide'); Cityscapes: 713
  stride_rate: float = 2 / 3
  base_size: int = 512  # long side at scale 1.0; Cityscapes: 2048
  window_batch: int = 0  # windows per network call (x2 with flip); 0: one per
  # local device. Rounded up to a multiple of the devices
  bucket_multiple: int = 128  # image sides padded up to this (compilation buckets)
  whole_multiple: int = 64  # 'whole': short side of the canvas padded up to this
  per_scale: bool = False  # also score each scale alone (in the same pass)
  ignore_label: int = metrics.IGNORE_LABEL

  def __post_init__(self):
    object.__setattr__(self, 'scales', tuple(float(s) for s in self.scales))
    if self.mode not in ('slide', 'whole'):
      raise UserError(f"config key eval.mode={self.mode!r}: give 'slide' or 'whole'")
    # The numeric fields' ranges are the config's (config_file.RANGES): one set of rules
    # for the CLI and for EvalConfig built in Python.
    config_file.check_values({'eval': dataclasses.asdict(self)})

  @classmethod
  def from_config(cls, fields, ignore_label: int) -> EvalConfig:
    """``config.eval`` (every field is a key) for a dataset that ignores ``ignore_label``."""
    fields = dict(fields)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise UserError(f'config.eval has unknown keys {unknown}; the keys are {known}')
    if fields.setdefault('ignore_label', ignore_label) != ignore_label:
      raise UserError(
        f'config.eval.ignore_label={fields["ignore_label"]} but the dataset ignores '
        f'{ignore_label}: set it to {ignore_label}'
      )
    return cls(**fields)

  @property
  def stride(self) -> int:
    return int(math.ceil(self.crop_size * self.stride_rate))

  def long_side(self, scale: float) -> int:
    return int(round(scale * self.base_size))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def resized_size(h: int, w: int, long_side: int) -> tuple[int, int]:
  """semseg: the long side becomes ``long_side``, the short side keeps the aspect ratio."""
  if h > w:
    return long_side, int(round(long_side / float(h) * w))
  return int(round(long_side / float(w) * h)), long_side


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Window starts along one padded axis of length ``size >= crop`` (semseg's grid)."""
  grid = int(math.ceil(float(size - crop) / stride) + 1)
  return [min(i * stride + crop, size) - crop for i in range(grid)]


def _taps(in_size: int, out_size: int, out_len: int, out_offset: int, in_offset: int):
  """OpenCV's linear taps (``cv2.resize``, as semseg resizes) as fixed-length arrays: output ``out_offset + j`` (``j <
  out_size``) reads input ``in_offset + i0/i1``; every other of the ``out_len`` outputs has
  zero weights (padding: zero is the mean after normalisation)."""
  i0, i1, w0, w1 = ops.linear_taps(in_size, out_size, convention='opencv')
  idx = np.full((2, out_len), in_offset, np.int32)
  wts = np.zeros((2, out_len), np.float32)
  sl = slice(out_offset, out_offset + out_size)
  idx[0, sl], idx[1, sl] = i0 + in_offset, i1 + in_offset
  wts[0, sl], wts[1, sl] = w0, w1
  return idx, wts


def _apply_taps(a: jax.Array, taps, axis: int) -> jax.Array:
  """Two-tap linear interpolation of ``a`` along ``axis`` with ``_taps``' arrays."""
  (i0, i1), (w0, w1) = taps
  bshape = [1] * a.ndim
  bshape[axis] = -1
  return jnp.take(a, i0, axis=axis) * w0.reshape(bshape) + jnp.take(a, i1, axis=axis) * w1.reshape(
    bshape
  )


def _canvas(x: jax.Array, plan: dict) -> jax.Array:
  """x [Hb, Wb, 3] -> the resized, padded image of one scale [PH, PW, 3] (protocol 1-2)."""
  return _apply_taps(_apply_taps(x, plan['in_rows'], 0), plan['in_cols'], 1)


@dataclasses.dataclass(frozen=True)
class _ScaleShape:
  """Static shapes of one scale in one bucket."""

  canvas: tuple[int, int]
  window: tuple[int, int]
  batch: int  # windows per network call
  max_windows: int  # a multiple of ``batch``


class Evaluator:
  """Runs the protocol of ``config`` with ``model``'s weights; see the module docstring.

  ``mesh``: the devices to run on, by default every local device of this process
  (``mesh.local_mesh()``). The model's variables are replicated over it, wherever they
  lived before (one device, another mesh, a multi-process training state), and window
  batches are sharded over it along the batch axis (``window_batch`` is rounded up to a
  multiple of its size). Splitting a dataset over processes is ``evaluate``'s job.

  ``compilations`` counts the programs traced so far (one per bucket and entry point).
  """

  def __init__(self, model: PSPNet, config: EvalConfig = EvalConfig(), mesh: Mesh | None = None):
    self.config = config
    self.num_classes = model.config.num_classes
    self.mesh = mesh_lib.local_mesh() if mesh is None else mesh
    self.window_batch = _round_up(config.window_batch or self.mesh.size, self.mesh.size)
    self.compilations = 0
    self.set_model(model)
    self._probs = jax.jit(self._probs_program, static_argnames='key')
    self._confusion = jax.jit(self._confusion_program, static_argnames='key')
    self._group_confusion = jax.jit(self._group_program, static_argnames='key')
    self._predict = jax.jit(self._labels_program, static_argnames='key')
    self._spread = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))  # a leading axis

  def set_model(self, model: PSPNet):
    """Takes new weights (e.g. after a training step); compiled programs are kept as long
    as the architecture is the same. ``model`` itself is not switched to eval mode."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.eval()
    graphdef, state = nnx.split(copy)
    if getattr(self, 'graphdef', graphdef) != graphdef:
      raise ValueError('set_model: a different architecture; build a new Evaluator')
    self.graphdef = graphdef
    self.state = mesh_lib.replicate(state, self.mesh)
    # The normalisation the weights expect; part of the config, hence of the graphdef.
    self.mean = np.asarray(model.config.mean, np.float32)
    self.std = np.asarray(model.config.std, np.float32)

  # ---- host side: shapes and per-image data ------------------------------------------

  def bucket(self, h: int, w: int) -> tuple:
    """The compilation key of an ``h x w`` image: padded size and per-scale shapes."""
    m = self.config.bucket_multiple
    return (_round_up(h, m), _round_up(w, m)) + tuple(
      self._scale_shape(h, w, s) for s in self.config.scales
    )

  def _scale_shape(self, h: int, w: int, scale: float) -> _ScaleShape:
    cfg = self.config
    long_side = cfg.long_side(scale)
    if cfg.mode == 'whole':
      nh, nw = resized_size(h, w, long_side)
      canvas = (
        min(_round_up(nh, cfg.whole_multiple), max(nh, long_side)),
        min(_round_up(nw, cfg.whole_multiple), max(nw, long_side)),
      )
      # One window per image and scale; a batch of mesh.size keeps every device busy
      # (the copies are masked out) with one program for any device count.
      batch = self.mesh.size
      return _ScaleShape(canvas, canvas, batch, batch)
    side = max(long_side, cfg.crop_size)
    g = len(window_starts(side, cfg.crop_size, cfg.stride))
    b = self.window_batch
    return _ScaleShape((side, side), (cfg.crop_size,) * 2, b, _round_up(g * g, b))

  def _plan(self, h: int, w: int, bucket: tuple) -> list[dict]:
    """Per-scale arrays (taps, window offsets, counts) for one image, as NumPy."""
    cfg = self.config
    hb, wb = bucket[:2]
    plans = []
    for scale, shape in zip(cfg.scales, bucket[2:]):
      nh, nw = resized_size(h, w, cfg.long_side(scale))
      ch, cw = shape.window
      ph, pw = max(nh, ch), max(nw, cw)  # padded resized image
      top, left = (ph - nh) // 2, (pw - nw) // 2
      starts = [
        (y, x)
        for y in window_starts(ph, ch, cfg.stride if cfg.mode == 'slide' else ch)
        for x in window_starts(pw, cw, cfg.stride if cfg.mode == 'slide' else cw)
      ]
      n = len(starts)
      offsets = np.zeros((shape.max_windows, 2), np.int32)
      offsets[:n] = starts
      valid = np.zeros(shape.max_windows, np.float32)
      valid[:n] = 1
      plans.append(
        {
          'in_rows': _taps(h, nh, shape.canvas[0], top, 0),
          'in_cols': _taps(w, nw, shape.canvas[1], left, 0),
          'out_rows': _taps(nh, h, hb, 0, top),
          'out_cols': _taps(nw, w, wb, 0, left),
          'offsets': offsets,
          'valid': valid,
          'windows': np.int32(n),
          'batches': np.int32(-(-n // shape.batch)),
        }
      )
    return plans

  def _inputs(self, image: np.ndarray):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
      raise UserError(f'image must be [H, W, 3] RGB, got shape {image.shape}')
    h, w = image.shape[:2]
    key = self.bucket(h, w)
    padded = np.zeros(key[:2] + (3,), np.uint8)
    padded[:h, :w] = image
    return key, padded, self._plan(h, w, key)

  # ---- device side ---------------------------------------------------------------------

  def _window_probs(self, state, windows: jax.Array) -> jax.Array:
    """windows: [B, h, w, 3] normalised -> softmax [B, h, w, C], averaged with the flip.
    Runs on one device's windows (``_accumulate``: alone, or inside a ``shard_map``)."""
    b = windows.shape[0]
    if self.config.flip:  # semseg runs the window and its flip as one batch
      windows = jnp.concatenate([windows, windows[:, :, ::-1]], axis=0)
    probs = jax.nn.softmax(nnx.merge(self.graphdef, state)(windows), axis=-1)
    if self.config.flip:
      probs = (probs[:b] + probs[b:, :, ::-1]) / 2
    return probs

  def _accumulate(self, state, canvas, offsets, valid, trips, shape: _ScaleShape):
    """One device's windows of one scale: ``trips`` batches of ``offsets`` [n, per, 2]
    (``valid`` [n, per] masks absent windows) cut from ``canvas`` [PH, PW, 3], their
    probabilities added into a canvas of its own. Returns (acc [PH, PW, C], count [PH, PW])."""
    c = self.num_classes
    wh, ww = shape.window
    per = offsets.shape[1]

    def body(i, carry):
      acc, count = carry
      windows = jax.vmap(lambda o: jax.lax.dynamic_slice(canvas, (o[0], o[1], 0), (wh, ww, 3)))(
        offsets[i]
      )
      probs = self._window_probs(state, windows)
      for k in range(per):  # windows overlap: add them one after another
        y, xx = offsets[i, k, 0], offsets[i, k, 1]
        acc = jax.lax.dynamic_update_slice(
          acc,
          jax.lax.dynamic_slice(acc, (y, xx, 0), (wh, ww, c)) + probs[k] * valid[i, k],
          (y, xx, 0),
        )
        count = jax.lax.dynamic_update_slice(
          count, jax.lax.dynamic_slice(count, (y, xx), (wh, ww)) + valid[i, k], (y, xx)
        )
      return acc, count

    acc = jnp.zeros(shape.canvas + (c,), jnp.float32)
    count = jnp.zeros(shape.canvas, jnp.float32)
    return jax.lax.fori_loop(0, trips, body, (acc, count))

  @staticmethod
  def _finish(acc, count, plan: dict, start=0, rows: int | None = None) -> jax.Array:
    """Average overlapping windows pixel by pixel, then resize to [Hb, Wb, C] (semseg
    divides, then resizes): gather rows of both, divide, interpolate; then the columns.
    ``rows`` output rows from ``start`` only, when given ([rows, Wb, C])."""
    (r0, r1), (rw0, rw1) = plan['out_rows']
    if rows is not None:
      r0, r1, rw0, rw1 = (jax.lax.dynamic_slice_in_dim(a, start, rows) for a in (r0, r1, rw0, rw1))
    count = jnp.maximum(count, 1.0)[..., None]  # pixels outside all windows are never read
    out = (acc[r0] / count[r0]) * rw0[:, None, None] + (acc[r1] / count[r1]) * rw1[:, None, None]
    return _apply_taps(out, plan['out_cols'], 1)

  def _scale_canvas(self, state, x: jax.Array, plan: dict, shape: _ScaleShape):
    """One scale of one image on every device: x [Hb, Wb, 3] normalised -> the windows'
    summed probabilities and counts on the scale's canvas, (acc [PH, PW, C], count [PH, PW]).

    Each device runs its share of every window batch (``batch / devices`` windows, the same
    windows as a sharded batch would give it) and adds them into a canvas of its own; the
    canvases are summed across devices once, after the window loop. (A replicated canvas
    fed by sharded windows would ship every window's probabilities between devices.)
    ``evaluate_dataset`` on several devices goes further: one image per device
    (``_group_program``), and nothing but confusion counts crosses between them.
    """
    canvas = _canvas(x, plan)
    devices, axes = self.mesh.size, self.mesh.axis_names
    per = shape.batch // devices
    # [batches, devices, windows per device, ...]: device d takes [:, d] of every batch.
    offsets = plan['offsets'].reshape(-1, devices, per, 2)
    valid = plan['valid'].reshape(-1, devices, per)

    def local(state, canvas, offsets, valid, batches):
      acc, count = self._accumulate(state, canvas, offsets[:, 0], valid[:, 0], batches, shape)
      return jax.lax.psum((acc, count), axes)

    spread, whole = PartitionSpec(None, axes), PartitionSpec()
    return jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(whole, whole, spread, spread, whole),
      out_specs=whole,
      check_vma=False,
    )(state, canvas, offsets, valid, plan['batches'])

  def _normalise(self, image: jax.Array) -> jax.Array:
    """[Hb, Wb, 3] uint8 -> float32 with the model's own mean and std."""
    return (image.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def _canvases(self, state, image: jax.Array, plans: Sequence[dict], key: tuple) -> list:
    """image: [Hb, Wb, 3] uint8 -> per scale (acc, count), one image's windows spread over
    the devices."""
    x = self._normalise(image)
    return [self._scale_canvas(state, x, plan, shape) for plan, shape in zip(plans, key[2:])]

  def _local_canvases(self, state, image: jax.Array, plans: Sequence[dict], key: tuple) -> list:
    """The same, for one image on one device (inside ``_group_program``)."""
    x = self._normalise(image)
    per = self.window_batch // self.mesh.size
    out = []
    for plan, shape in zip(plans, key[2:]):
      trips = (plan['windows'] + per - 1) // per
      out.append(
        self._accumulate(
          state,
          _canvas(x, plan),
          plan['offsets'].reshape(-1, per, 2),
          plan['valid'].reshape(-1, per),
          trips,
          shape,
        )
      )
    return out

  def _labels(self, canvases: list, plans: Sequence[dict], key: tuple) -> list:
    """Class ids [Hb, Wb] of the scales combined (then of each scale alone when
    ``per_scale``), computed ``bucket_multiple`` output rows at a time: the full-resolution
    probabilities ([Hb, Wb, C] float32, 14 GB for 150 classes at 6000x4000) never exist,
    only one band of them. Per pixel the same arithmetic as ``probabilities``' argmax."""
    hb, wb = key[:2]
    band = self.config.bucket_multiple  # divides hb
    k = 1 + (len(canvases) if self.config.per_scale else 0)
    dtype = jnp.uint8 if self.num_classes <= 256 else jnp.int32

    def body(t, out):
      start = t * band
      maps = [
        self._finish(acc, count, plan, start, band) for (acc, count), plan in zip(canvases, plans)
      ]
      maps = [sum(maps) / len(maps)] + (maps if self.config.per_scale else [])
      labels = jnp.stack([jnp.argmax(m, axis=-1).astype(dtype) for m in maps])
      return jax.lax.dynamic_update_slice(out, labels, (0, start, 0))

    out = jax.lax.fori_loop(0, hb // band, body, jnp.zeros((k, hb, wb), dtype))
    return list(out)

  def _counts(self, preds: list, label: jax.Array) -> list:
    """Confusion counts [C, C] of each prediction against ``label``."""
    return [
      metrics.confusion_matrix(p, label, self.num_classes, self.config.ignore_label) for p in preds
    ]

  def _group_program(self, state, images, labels, plans, acc, key):
    """``images`` [D, Hb, Wb, 3] uint8 and ``labels`` [D, Hb, Wb], one image per device of
    the mesh (``plans``: each image's, stacked on a leading axis): every device scores its
    own image, windows and canvases included, and only the confusion counts are summed
    across devices. Returns (acc, predictions [D, Hb, Wb])."""
    self.compilations += 1
    axes = self.mesh.axis_names

    def local(state, image, label, plans, acc):
      plans = jax.tree.map(lambda a: a[0], plans)
      preds = self._labels(self._local_canvases(state, image[0], plans, key), plans, key)
      counts = jax.lax.psum(jnp.stack(self._counts(preds, label[0])), axes)
      return jnp.stack([metrics.add_confusion(a, n) for a, n in zip(acc, counts)]), preds[0][None]

    spread, whole = PartitionSpec(axes), PartitionSpec()
    return jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(whole, spread, spread, spread, whole),
      out_specs=(whole, spread),
      check_vma=False,
    )(state, images, labels, plans, acc)

  def _probs_program(self, state, image, plans, key):
    """image: [Hb, Wb, 3] uint8 -> probabilities [Hb, Wb, C] averaged over scales."""
    self.compilations += 1  # runs once per trace, i.e. per compilation
    maps = [
      self._finish(acc, count, plan)
      for (acc, count), plan in zip(self._canvases(state, image, plans, key), plans)
    ]
    return sum(maps) / len(maps)

  def _labels_program(self, state, image, plans, key):
    """image: [Hb, Wb, 3] uint8 -> class ids [Hb, Wb] (the scales combined)."""
    self.compilations += 1
    return self._labels(self._canvases(state, image, plans, key), plans, key)[0]

  def _confusion_program(self, state, image, label, plans, acc, key):
    """acc: [K, 2, C, C] (``_empty_accumulator``): the combination, then each scale alone
    when ``per_scale``."""
    self.compilations += 1
    preds = self._labels(self._canvases(state, image, plans, key), plans, key)
    counts = self._counts(preds, label)
    return jnp.stack([metrics.add_confusion(a, n) for a, n in zip(acc, counts)]), preds[0]

  def _empty_accumulator(self) -> jax.Array:
    k = 1 + (len(self.config.scales) if self.config.per_scale else 0)
    return jnp.stack([metrics.empty_confusion(self.num_classes)] * k)

  def _new_accumulator(self) -> jax.Array:
    """On the mesh, replicated, as the program returns it: the first call of a set then
    compiles the same program as the following ones."""
    return jax.device_put(self._empty_accumulator(), NamedSharding(self.mesh, PartitionSpec()))

  # ---- public API ----------------------------------------------------------------------

  def lower(self, h: int, w: int, *, one_image_per_device: bool = False):
    """The program that scores ``h x w`` images (their bucket's), traced and lowered for
    this evaluator's mesh but not run: for ahead-of-time compilation (``pspnet_jax.aot``),
    where the mesh may hold devices of a platform this host does not have.

    ``one_image_per_device=False``: one image, its windows spread over the devices
    (``probabilities``, ``predict``); True: one image a device (``evaluate_dataset`` on
    several devices). Returns ``(lowered, window_batches)``: each device runs the network
    ``window_batches[s]`` times at scale s."""
    acc = jax.eval_shape(self._empty_accumulator)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    acc = jax.ShapeDtypeStruct(acc.shape, acc.dtype, sharding=replicated)
    spec = lambda a, sharding: jax.ShapeDtypeStruct(
      np.shape(a), np.asarray(a).dtype, sharding=sharding
    )
    if one_image_per_device:
      images = [np.zeros((h, w, 3), np.uint8)] * self.mesh.size
      key, *args = self._group_arrays(images, [np.zeros((h, w), np.uint8)] * self.mesh.size)
      args = jax.tree.map(lambda a: spec(a, self._spread), args)
      lowered = self._group_confusion.trace(self.state, *args, acc, key=key).lower()
      per = self.window_batch // self.mesh.size
      windows = self._plan(h, w, key)
      return lowered, [-(-int(p['windows']) // per) for p in windows]
    key, padded, plans = self._inputs(np.zeros((h, w, 3), np.uint8))
    label = np.zeros(padded.shape[:2], np.uint8)
    args = jax.tree.map(lambda a: spec(a, replicated), (padded, label, plans))
    lowered = self._confusion.trace(self.state, *args, acc, key=key).lower()
    return lowered, [int(p['batches']) for p in plans]

  def probabilities(self, image) -> np.ndarray:
    """image: [H, W, 3] uint8 RGB -> class probabilities [H, W, C] float32 (protocol 1-7)."""
    key, padded, plans = self._inputs(image)
    h, w = np.asarray(image).shape[:2]
    probs = self._probs(self.state, padded, plans, key=key)
    return np.asarray(probs[:h, :w])

  def predict(self, image) -> np.ndarray:
    """image: [H, W, 3] uint8 RGB -> class ids [H, W] (argmax of ``probabilities``), uint8
    up to 256 classes. Memory is bounded by the canvases and one band of output rows, not
    by the full-resolution probabilities."""
    key, padded, plans = self._inputs(image)
    h, w = np.asarray(image).shape[:2]
    return np.asarray(self._predict(self.state, padded, plans, key=key)[:h, :w])

  def evaluate_dataset(
    self, examples: Iterable[dict], on_prediction: Callable[[int, np.ndarray], None] | None = None
  ):
    """Confusion matrix of the set, accumulated on device and read back once.

    examples: iterable of ``{'image': [H, W, 3] uint8, 'label': [H, W] uint8}`` (class ids,
    ``ignore_label`` ignored). ``on_prediction(index, pred)``, if given, receives each
    prediction ([H, W] uint8) on the host (e.g. to write PNGs), ``index`` being the
    example's position in ``examples``; without it nothing but the final matrix leaves the
    device.

    On several devices, each device scores whole images of its own (``_group_program``):
    images are grouped by their per-scale shapes, one a device, padded to the group's
    largest bucket (padding never changes a result), so that nothing but confusion counts
    crosses between devices. A group not full at the end runs with empty slots.

    Returns ``(confusion [C, C] int64, number of images, seconds)``; with
    ``config.per_scale`` the confusion is ``[1 + S, C, C]``: the scales combined, then each
    of the S scales alone.
    """
    acc = self._new_accumulator()
    start = time.perf_counter()
    n = 0
    pending: dict[tuple, list] = {}
    devices = self.mesh.size
    for n, ex in enumerate(examples, start=1):
      image, label = self._checked(n - 1, ex)
      if devices == 1:
        key, padded, plans = self._inputs(image)
        padded_label = self._pad_label(label, padded.shape[:2])
        acc, pred = self._confusion(self.state, padded, padded_label, plans, acc, key=key)
        if on_prediction is not None:
          on_prediction(n - 1, np.asarray(pred[: label.shape[0], : label.shape[1]]))
        continue
      shapes = self.bucket(*image.shape[:2])[2:]  # images alike in these share a program
      pending.setdefault(shapes, []).append((n - 1, image, label))
      if len(pending[shapes]) == devices:
        acc = self._run_group(pending.pop(shapes), acc, on_prediction)
    for group in pending.values():
      acc = self._run_group(group, acc, on_prediction)
    acc = np.asarray(acc)  # the one device -> host transfer
    confusion = np.stack([metrics.confusion_to_numpy(a) for a in acc])
    return (confusion if self.config.per_scale else confusion[0]), n, time.perf_counter() - start

  def _checked(self, index: int, ex: dict) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(ex['image']), np.asarray(ex['label'])
    if image.ndim != 3 or image.shape[2] != 3:
      raise UserError(f'example {index}: image must be [H, W, 3] RGB, got shape {image.shape}')
    if label.shape != image.shape[:2]:
      raise UserError(f'example {index}: label shape {label.shape} != image size {image.shape[:2]}')
    bad = (label != self.config.ignore_label) & (label >= self.num_classes)
    if bad.any():
      raise UserError(
        f'example {index}: label values {np.unique(label[bad])[:5].tolist()} are '
        f'neither class ids < {self.num_classes} nor {self.config.ignore_label}'
      )
    return image, label

  def _pad_label(self, label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    padded = np.full(size, self.config.ignore_label, np.uint8)
    padded[: label.shape[0], : label.shape[1]] = label
    return padded

  def _group_arrays(self, images: list[np.ndarray], labels: list[np.ndarray]):
    """(key, images, labels, plans) as NumPy for ``_group_program``: one image per device,
    padded to the group's largest bucket; empty slots (a group not full) score nothing: no
    windows, every label ignored."""
    keys = [self.bucket(*im.shape[:2]) for im in images]
    key = (max(k[0] for k in keys), max(k[1] for k in keys)) + keys[0][2:]
    batch_images = np.zeros((self.mesh.size,) + key[:2] + (3,), np.uint8)
    batch_labels = np.full((self.mesh.size,) + key[:2], self.config.ignore_label, np.uint8)
    plans = []
    for i in range(self.mesh.size):
      if i < len(images):
        h, w = images[i].shape[:2]
        batch_images[i, :h, :w] = images[i]
        batch_labels[i, :h, :w] = labels[i]
        plans.append(self._plan(h, w, key))
      else:
        plans.append(jax.tree.map(np.zeros_like, plans[0]))
    return key, batch_images, batch_labels, jax.tree.map(lambda *a: np.stack(a), *plans)

  def _run_group(self, group: list, acc, on_prediction):
    indices, images, labels = zip(*group)
    key, *arrays = self._group_arrays(list(images), list(labels))
    images_d, labels_d, plans = jax.device_put(arrays, self._spread)
    acc, preds = self._group_confusion(self.state, images_d, labels_d, plans, acc, key=key)
    if on_prediction is not None:
      preds = np.asarray(preds)
      for i, (index, image) in enumerate(zip(indices, images)):
        on_prediction(index, preds[i, : image.shape[0], : image.shape[1]])
    return acc
