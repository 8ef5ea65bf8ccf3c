"""The evaluation job (``eval.py``'s body): a checkpoint + a dataset split + the protocol in
``config.eval`` -> ``OUT/metrics.json``, the table, the IoU chart and, on request,
prediction PNGs."""

from __future__ import annotations

import dataclasses
import os

import jax

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax import data as data_lib
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.evaluation import metrics as metrics_lib
from pspnet_jax.evaluation.outputs import write_eval_outputs, write_prediction
from pspnet_jax.evaluation.protocol import EvalConfig, Evaluator
from pspnet_jax.palette import as_palette


def evaluate_checkpoint(config, checkpoint_path: str, out_dir: str, *,
                        save_predictions: bool = False, max_examples: int = 0) -> dict:
  """Evaluates ``checkpoint_path`` (model directory, training workdir or step directory)
  on ``config.dataset.eval_split`` with ``config.eval``; returns the metrics dict."""
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  info = data_lib.dataset_info(ds.name, data_dir)
  model = ckpt_lib.load_model(checkpoint_path)
  if model.config.num_classes != info.num_classes:
    raise ValueError(f'{checkpoint_path} predicts {model.config.num_classes} classes but '
                     f'{ds.name} has {info.num_classes}')
  model.eval()
  eval_config = EvalConfig(**dict(config.eval))
  if eval_config.ignore_label != info.ignore_label:
    eval_config = dataclasses.replace(eval_config, ignore_label=info.ignore_label)
  mesh = None
  if jax.device_count() > 1:
    mesh = mesh_lib.data_mesh()
  evaluator = Evaluator(model, eval_config, mesh)
  source = data_lib.eval_source(ds.name, ds.eval_split, data_dir)
  n = min(max_examples, len(source)) if max_examples else len(source)
  palette = as_palette(info.palette, info.num_classes)
  id_map = info.metadata.get('train_id_to_label_id') if info.metadata else None
  pred_dir = os.path.join(out_dir, 'predictions')

  def on_prediction(i, pred):
    ex = source[i]
    write_prediction(pred_dir, str(ex['id']).replace('/', '_'), pred, palette=palette,
                     image=ex['image'], id_map=id_map)

  confusion, count, seconds = evaluator.evaluate_dataset(
      (source[i] for i in range(n)), on_prediction=on_prediction if save_predictions else None)
  result = metrics_lib.segmentation_metrics(confusion, info.class_names)
  result.update(images=count, seconds=seconds,
                images_per_second=count / seconds if seconds > 0 else 0.0,
                compilations=evaluator.compilations)
  if jax.process_index() == 0:
    write_eval_outputs(out_dir, result, eval_config=eval_config,
                       extra={'checkpoint': os.path.abspath(checkpoint_path),
                              'dataset': ds.name, 'split': ds.eval_split})
  return result
