"""The server's one model: loaded once, compiled for the evaluator's shape buckets and warmed
up at start, run on one worker thread so that requests are segmented one at a time, in the
order they arrived, off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pspnet_jax import checkpoint
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.images import read_rgb
from pspnet_jax.evaluation.predict import model_classes
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator


def parse_sizes(text: str) -> list[tuple[int, int]]:
  """``'640x480,96x96'`` -> ``[(480, 640), (96, 96)]`` as (height, width); ``''``: none."""
  sizes = []
  for part in text.split(','):
    if not part.strip():
      continue
    try:
      w, h = (int(v) for v in part.lower().split('x'))
    except ValueError:
      raise UserError(f'--warm-up {text!r}: give sizes as WIDTHxHEIGHT, e.g. 640x480') from None
    if w < 1 or h < 1:
      raise UserError(f'--warm-up {text!r}: sizes must be positive')
    sizes.append((h, w))
  return sizes


@dataclasses.dataclass
class Segmentation:
  """One request's result: ``labels`` [H, W] class ids, the seconds spent waiting for the
  model and in it, and whether the request compiled a program (a new shape bucket)."""

  labels: np.ndarray
  queue_s: float
  inference_s: float
  compiled: bool


class Segmenter:
  """``model_dir``'s model under the protocol ``config``; see the module docstring."""

  def __init__(self, model_dir: str, config: EvalConfig):
    start = time.perf_counter()
    model = checkpoint.load_model(model_dir)
    self.model_dir = model_dir
    self.model_config = model.config
    self.num_classes = model.config.num_classes
    self.palette, self.class_names = model_classes(model_dir, self.num_classes)
    self.evaluator = Evaluator(model, config)
    self.load_s = time.perf_counter() - start
    self.warm_up_s = 0.0
    self.warm_sizes: list[tuple[int, int]] = []
    # One thread runs the model: a FIFO queue, and the event loop never waits on XLA.
    self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='segmenter')
    self._lock = threading.Lock()  # callers of `segment` from other threads queue here too

  @property
  def config(self) -> EvalConfig:
    return self.evaluator.config

  def buckets(self, sizes) -> list[tuple]:
    """The distinct compilation keys (``Evaluator.bucket``) of images of ``sizes`` (h, w)."""
    return list(dict.fromkeys(self.evaluator.bucket(h, w) for h, w in sizes))

  def warm_up(self, sizes: list[tuple[int, int]]) -> float:
    """Compiles and runs the program of each size's bucket once, the PNG decoder and
    encoder a request goes through included; returns the seconds taken."""
    start = time.perf_counter()
    for h, w in sizes:
      buf = io.BytesIO()
      Image.new('RGB', (w, h)).save(buf, format='PNG')
      self.mask_png(self.segment(read_rgb(buf)).labels)
    self.warm_up_s = time.perf_counter() - start
    self.warm_sizes = list(sizes)
    return self.warm_up_s

  def segment(self, image: np.ndarray) -> Segmentation:
    """image: [H, W, 3] uint8 RGB -> its ``Segmentation``, one caller at a time."""
    queued = time.perf_counter()
    with self._lock:
      start = time.perf_counter()
      before = self.evaluator.compilations
      labels = self.evaluator.predict(image)
      end = time.perf_counter()
      compiled = self.evaluator.compilations > before
    return Segmentation(labels, start - queued, end - start, compiled)

  async def segment_async(self, image: np.ndarray) -> Segmentation:
    """``segment`` on the worker thread, awaited: requests run in the order they came."""
    return await asyncio.get_running_loop().run_in_executor(self._worker, self.segment, image)

  def close(self):
    self._worker.shutdown(wait=False, cancel_futures=True)

  def class_pixels(self, labels: np.ndarray) -> list[dict]:
    """The classes present in ``labels``, ``{'id', 'name', 'pixels'}``, largest first."""
    counts = np.bincount(labels.ravel(), minlength=self.num_classes)
    present = [int(i) for i in np.flatnonzero(counts)]
    present.sort(key=lambda i: (-counts[i], i))
    return [{'id': i, 'name': self.class_names[i], 'pixels': int(counts[i])} for i in present]

  def mask_png(self, labels: np.ndarray) -> bytes:
    """The class ids as a PNG at the image's size: an index image (``np.asarray(Image.open
    (...))`` gives the ids) whose palette is the model's, so a viewer shows the colour mask.
    Over 256 classes, a 16-bit grayscale PNG of the ids."""
    buf = io.BytesIO()
    if self.num_classes <= 256:
      im = Image.fromarray(labels.astype(np.uint8))
      im.putpalette(  # 'L' -> 'P': the same bytes, now indices into the palette
        self.palette.astype(np.uint8).ravel().tolist()
      )
    else:
      im = Image.fromarray(labels.astype(np.uint16))
    im.save(buf, format='PNG')
    return buf.getvalue()
