"""A dataset split evaluated over every process: each process takes its own share of the
images (balanced by their cost under the protocol, not by count), runs the compiled
protocol on its local devices, and the confusion matrices are summed exactly across
processes, so the metrics equal those of one process on the whole split."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pspnet_jax import mesh as mesh_lib
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation import metrics
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator, resized_size, window_starts
from pspnet_jax.models import PSPNet


def image_cost(h: int, w: int, config: EvalConfig) -> int:
  """Pixels the network sees for an ``h x w`` image under ``config`` (all scales; slide:
  windows x crop area), the measure the shares are balanced by."""
  total = 0
  for scale in config.scales:
    nh, nw = resized_size(h, w, config.long_side(scale))
    if config.mode == 'slide':
      crop = config.crop_size
      windows = len(window_starts(max(nh, crop), crop, config.stride)) * len(
        window_starts(max(nw, crop), crop, config.stride)
      )
      total += windows * crop * crop
    else:
      total += nh * nw
  return total


def process_shares(costs: Sequence[float], num_processes: int) -> list[list[int]]:
  """Indices of ``costs`` split into ``num_processes`` shares of near-equal total cost:
  the costliest image first, each to the share with the least cost so far (ties to the
  lower process). Deterministic; each share is in ascending index order."""
  loads = [0.0] * num_processes
  shares: list[list[int]] = [[] for _ in range(num_processes)]
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    p = min(range(num_processes), key=lambda q: (loads[q], q))
    shares[p].append(i)
    loads[p] += costs[i]
  return [sorted(s) for s in shares]


def _image_size(source, i: int) -> tuple[int, int]:
  if hasattr(source, 'image_size'):  # data.RecordSource reads it without decoding
    return source.image_size(i)
  return tuple(np.asarray(source[i]['image']).shape[:2])


WHOLE_IMAGE = EvalConfig(mode='whole')  # frozen: one shared default is safe


def evaluate(
  model: PSPNet,
  examples: Sequence[dict],
  num_classes: int | None = None,
  eval_config: EvalConfig = WHOLE_IMAGE,
  class_names: Sequence[str] | None = None,
  mesh: Mesh | None = None,
  *,
  num_examples: int = 0,
  on_prediction: Callable[[int, np.ndarray], None] | None = None,
) -> dict:
  """Scores ``model`` on the first ``num_examples`` (0: all) of ``examples`` with the
  protocol of ``eval_config``, over every process of the run (each evaluates its share on
  ``mesh``, default its local devices). Every process must call it; all get the metrics.

  examples: a sequence of ``{'image': [H, W, 3] uint8, 'label': [H, W] uint8}`` (e.g.
  ``data.eval_source``). ``on_prediction(index, pred)`` receives this process's
  predictions, with their index in ``examples``.

  Returns the dict of ``metrics.segmentation_metrics`` plus ``images``, ``seconds``,
  ``images_per_second``, ``processes``, ``devices``, ``per_process_images`` and
  ``compilations`` (this process's); with ``eval_config.per_scale``, ``per_scale`` maps each
  scale (as written in the config, e.g. ``'0.5'``) to its own metrics.

  Evaluators are cached per architecture and protocol, so calling this every few thousand
  steps with new weights compiles only the first time.
  """
  if num_classes is not None and num_classes != model.config.num_classes:
    raise UserError(f'num_classes={num_classes} but the model has {model.config.num_classes}')
  if not hasattr(examples, '__getitem__'):
    examples = list(examples)
  n = min(num_examples, len(examples)) if num_examples else len(examples)
  start = time.perf_counter()
  shares = process_shares(
    [image_cost(*_image_size(examples, i), eval_config) for i in range(n)], jax.process_count()
  )
  mine = shares[jax.process_index()]
  evaluator = _evaluator(model, eval_config, mesh)
  callback = None if on_prediction is None else (lambda k, pred: on_prediction(mine[k], pred))
  confusion, _, _ = evaluator.evaluate_dataset((examples[i] for i in mine), on_prediction=callback)
  confusion = mesh_lib.sum_over_processes(confusion)
  seconds = time.perf_counter() - start
  combined = confusion[0] if eval_config.per_scale else confusion
  result = metrics.segmentation_metrics(combined, class_names)
  if eval_config.per_scale:
    result['per_scale'] = {
      f'{s:g}': metrics.segmentation_metrics(c, class_names)
      for s, c in zip(eval_config.scales, confusion[1:])
    }
  result.update(
    images=n,
    seconds=seconds,
    images_per_second=n / seconds if seconds > 0 else 0.0,
    processes=jax.process_count(),
    devices=jax.device_count(),
    per_process_images=[len(s) for s in shares],
    compilations=evaluator.compilations,
  )
  return result


def _evaluator(model: PSPNet, config: EvalConfig, mesh: Mesh | None) -> Evaluator:
  key = (nnx.split(model)[0], config, None if mesh is None else id(mesh))
  evaluator = _EVALUATORS.get(key)
  if evaluator is None:
    evaluator = _EVALUATORS[key] = Evaluator(model, config, mesh)
  else:
    evaluator.set_model(model)
  return evaluator


_EVALUATORS: dict = {}
