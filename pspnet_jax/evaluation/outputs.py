"""Evaluation results on disk: ``metrics.json``, a printed table, a per-class IoU bar chart,
and predictions as pictures (label PNGs, colourised PNGs, image/prediction overlays).

``metrics.json`` holds the keys of ``metrics.segmentation_metrics`` (``miou``, ``macc``,
``allacc``, ``fwiou`` in [0, 1], ``per_class``: list of ``{name, iou, precision, recall,
f1}``) plus ``images``, ``seconds`` (total wall time, compilation included) and
``images_per_second``; undefined values (a class absent from truth and prediction) are
``null``. The chart is drawn with Pillow, to keep plotting libraries out of the dependencies.

Label PNGs hold one uint8 class id per pixel. Models predict *training* ids (0..C-1); a
benchmark server may want the dataset's own ids instead (Cityscapes wants labelIds, not
trainIds), so ``write_prediction`` takes a lookup table ``id_map`` (``id_map[train_id]`` =
the id written), e.g. a dataset's ``train_id_to_label_id`` metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pspnet_jax.output_dir import atomic

METRICS_FILE = 'metrics.json'
TABLE_FILE = 'table.txt'
CHART_FILE = 'per_class_iou.png'
OVERLAY_ALPHA = 0.5  # weight of the colourised prediction over the image


def _pct(x) -> str:
  return '   -  ' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:6.2f}'


def format_table(metrics: dict) -> str:
  """Per-class IoU / precision / recall / F1 (%) with class names, then the means."""
  rows = metrics['per_class']
  width = max([len('class')] + [len(r['name']) for r in rows])
  head = f'{"id":>4}  {"class":<{width}}  {"IoU":>6}  {"prec":>6}  {"recall":>6}  {"F1":>6}'
  lines = [head, '-' * len(head)]
  for i, r in enumerate(rows):
    lines.append(
      f'{i:>4}  {r["name"]:<{width}}  {_pct(r["iou"])}  {_pct(r["precision"])}  '
      f'{_pct(r["recall"])}  {_pct(r["f1"])}'
    )
  lines.append('-' * len(head))
  lines.append(
    f'mIoU {_pct(metrics["miou"])}  mAcc {_pct(metrics["macc"])}  '
    f'allAcc {_pct(metrics["allacc"])}  fwIoU {_pct(metrics["fwiou"])}'
  )
  for scale, m in (metrics.get('per_scale') or {}).items():
    lines.append(
      f'scale {scale}: mIoU {_pct(m["miou"])}  mAcc {_pct(m["macc"])}  allAcc {_pct(m["allacc"])}'
    )
  if 'images' in metrics:
    where = (
      f' on {metrics["processes"]} process(es), {metrics["devices"]} device(s)'
      if 'devices' in metrics
      else ''
    )
    lines.append(
      f'{metrics["images"]} images in {metrics.get("seconds", 0.0):.1f} s '
      f'({metrics.get("images_per_second", 0.0):.3f} images/s){where}'
    )
  return '\n'.join(lines)


def iou_bar_chart(metrics: dict, title: str = 'per-class IoU') -> Image.Image:
  """One horizontal bar per class (IoU in %, grey '-' where undefined); mIoU as a line."""
  rows = metrics['per_class']
  font = ImageFont.load_default()
  row_h, bar_w, pad = 14, 400, 8
  label_w = 8 + 6 * max(len(f'{i} {r["name"]}') for i, r in enumerate(rows))
  width = pad + label_w + bar_w + 60
  height = 2 * pad + 2 * row_h + row_h * len(rows)
  img = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(img)
  draw.text((pad, pad), f'{title}: mIoU {_pct(metrics["miou"]).strip()}%', fill='black', font=font)
  x0 = pad + label_w
  top = pad + 2 * row_h
  miou = metrics['miou']
  if miou is not None and not math.isnan(miou):  # drawn first: bars and numbers stay readable
    x = x0 + round(bar_w * miou)
    draw.line([x, top, x, height - pad], fill=(200, 40, 40), width=1)
  for i, r in enumerate(rows):
    y = top + i * row_h
    draw.text((pad, y), f'{i} {r["name"]}', fill='black', font=font)
    if r['iou'] is None:
      draw.text((x0 + 2, y), '-', fill='grey', font=font)
      continue
    draw.rectangle([x0, y + 2, x0 + round(bar_w * r['iou']), y + row_h - 3], fill=(70, 110, 180))
    draw.text(
      (x0 + round(bar_w * r['iou']) + 4, y), _pct(r['iou']).strip(), fill='black', font=font
    )
  return img


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def write_eval_outputs(
  out_dir: str,
  metrics: dict,
  *,
  eval_config=None,
  extra: dict | None = None,
  print_table: bool = True,
) -> dict[str, str]:
  """Writes ``metrics.json``, ``table.txt`` and ``per_class_iou.png`` under ``out_dir``.

  ``eval_config`` (an ``EvalConfig``) and ``extra`` (e.g. checkpoint path) are recorded in
  the JSON under ``eval_config`` / their own keys. Returns {kind: path}.
  """
  os.makedirs(out_dir, exist_ok=True)
  payload = dict(metrics)
  for key in ('images_per_second', 'seconds', 'images'):
    payload.setdefault(key, None)
  if eval_config is not None:
    payload['eval_config'] = dataclasses.asdict(eval_config)
  payload.update(extra or {})
  paths = {
    'metrics': os.path.join(out_dir, METRICS_FILE),
    'table': os.path.join(out_dir, TABLE_FILE),
    'chart': os.path.join(out_dir, CHART_FILE),
  }
  table = format_table(metrics)
  if print_table:
    print(table)
  with atomic(paths['metrics']) as tmp, open(tmp, 'w') as f:
    json.dump(_json_safe(payload), f, indent=2, allow_nan=False)
  with atomic(paths['table']) as tmp, open(tmp, 'w') as f:
    f.write(table + '\n')
  with atomic(paths['chart']) as tmp:
    iou_bar_chart(metrics).save(tmp)
  return paths


# --- Predictions as pictures ---------------------------------------------------------


def colorize(pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """pred: [H, W] class ids -> [H, W, 3] uint8 RGB."""
  return palette[np.asarray(pred)]


def overlay(
  image: np.ndarray, pred: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
  """image: [H, W, 3] uint8, pred: [H, W] -> [H, W, 3] uint8 blend of image and colours."""
  blend = (1 - alpha) * np.asarray(image, np.float32) + alpha * colorize(pred, palette).astype(
    np.float32
  )
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def map_ids(pred: np.ndarray, id_map: Sequence[int] | None) -> np.ndarray:
  """Training ids -> the ids to write (``id_map[train_id]``), as uint8."""
  if id_map is None:
    return np.asarray(pred).astype(np.uint8)
  table = np.asarray(id_map, np.int64)
  if table.min() < 0 or table.max() > 255:
    raise ValueError('id_map values must fit a uint8 PNG (0..255)')
  if np.asarray(pred).max(initial=0) >= len(table):
    raise ValueError(
      f'prediction holds class {int(np.max(pred))} but id_map has {len(table)} entries'
    )
  return table[np.asarray(pred)].astype(np.uint8)


# The files of one prediction, <stem> + each: ids, palette colours, overlay on the photo.
PREDICTION_SUFFIXES = ('.png', '_color.png', '_overlay.jpg')


def write_prediction(
  out_dir: str,
  stem: str,
  pred: np.ndarray,
  *,
  palette: np.ndarray,
  image: np.ndarray | None = None,
  id_map: Sequence[int] | None = None,
  color: bool = True,
) -> list[str]:
  """Writes ``<stem>.png`` (ids, uint8), ``<stem>_color.png`` and, given the image,
  ``<stem>_overlay.jpg``. Returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  ids, colored, overlaid = (os.path.join(out_dir, stem + s) for s in PREDICTION_SUFFIXES)
  paths = [ids]
  with atomic(ids) as tmp:
    Image.fromarray(map_ids(pred, id_map), mode='L').save(tmp)
  if color:
    paths.append(colored)
    with atomic(colored) as tmp:
      Image.fromarray(colorize(pred, palette), mode='RGB').save(tmp)
  if image is not None:
    paths.append(overlaid)
    with atomic(overlaid) as tmp:
      Image.fromarray(overlay(image, pred, palette), mode='RGB').save(tmp, quality=90)
  return paths
