"""The evaluation job (``eval.py``'s body): a checkpoint + a dataset split + the protocol in
``config.eval`` -> ``OUT/metrics.json``, the table, the IoU chart and, on request,
prediction PNGs. Runs on every device of every process (``evaluation.dataset``); process 0
writes the outputs, each process the prediction PNGs of its own images."""

from __future__ import annotations

import os

import jax

from pspnet_jax import checkpoint as ckpt_lib
from pspnet_jax import config_file, ops, output_dir
from pspnet_jax import data as data_lib
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.dataset import evaluate
from pspnet_jax.evaluation.outputs import (
  METRICS_FILE,
  format_table,
  write_eval_outputs,
  write_prediction,
)
from pspnet_jax.evaluation.protocol import EvalConfig
from pspnet_jax.palette import as_palette


def evaluate_checkpoint(
  config,
  checkpoint_path: str,
  out_dir: str,
  *,
  save_predictions: bool = False,
  max_examples: int = 0,
) -> dict:
  """Evaluates ``checkpoint_path`` (model directory, training workdir or step directory)
  on ``config.dataset.eval_split`` with ``config.eval``; returns the metrics dict."""
  config_file.check_values(config)
  ops.configure_conv(**dict(config.conv))
  out_dir = output_dir.claim(out_dir, marker=METRICS_FILE, what='evaluation')
  ds = config.dataset
  data_dir = os.path.abspath(os.path.expanduser(ds.data_dir))
  info = data_lib.dataset_info(ds.name, data_dir)
  model = ckpt_lib.load_model(checkpoint_path, all_processes=True)  # every process runs this
  if model.config.num_classes != info.num_classes:
    raise UserError(
      f'{checkpoint_path} predicts {model.config.num_classes} classes but '
      f'{ds.name} has {info.num_classes}'
    )
  eval_config = EvalConfig.from_config(config.eval, info.ignore_label)
  source = data_lib.eval_source(ds.name, ds.eval_split, data_dir)
  palette = as_palette(info.palette, info.num_classes)
  id_map = info.metadata.get('train_id_to_label_id') if info.metadata else None
  pred_dir = os.path.join(out_dir, 'predictions')

  def on_prediction(i, pred):
    ex = source[i]
    write_prediction(
      pred_dir,
      str(ex['id']).replace('/', '_'),
      pred,
      palette=palette,
      image=ex['image'],
      id_map=id_map,
    )

  result = evaluate(
    model,
    source,
    eval_config=eval_config,
    class_names=info.class_names,
    num_examples=max_examples,
    on_prediction=on_prediction if save_predictions else None,
  )
  if jax.process_index() == 0:
    print(format_table(result), flush=True)  # first: shown even if writing them fails
    try:
      write_eval_outputs(
        out_dir,
        result,
        eval_config=eval_config,
        print_table=False,
        extra={
          'checkpoint': os.path.abspath(checkpoint_path),
          'dataset': ds.name,
          'split': ds.eval_split,
        },
      )
    except OSError as e:
      raise UserError(
        f'--out {out_dir}: writing the outputs failed ({e.strerror}: {e.filename}); '
        'the metrics above are complete (free space or choose another --out)'
      ) from e
  return result
