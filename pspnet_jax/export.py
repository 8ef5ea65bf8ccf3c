"""Deployment artifacts: a trained or ported PSPNet as a self-contained program.

  python -m pspnet_jax.export MODEL_DIR --out DIR [--format stablehlo|onnx|onnx-int8|all]
      [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16] [--output logits|probabilities|classes]
      [--calibration FOLDER|dataset:NAME[:SPLIT] [--calibration-images N] [--crop-size N]
       [--data-dir DIR] [--per-channel|--per-tensor]]

``MODEL_DIR`` is any model directory ``pspnet_jax.checkpoint.load_model`` reads (the port
CLI's output, a training workdir, or one of its ``checkpoints/<step>``). ``DIR`` receives

- ``model.jax_exported``: the serialised ``jax.export.Exported`` of the network with its
  weights inside, for the platforms asked. A process with only ``jax`` and ``numpy``
  runs it: ``jax.export.deserialize(open(f, 'rb').read()).call(images)``.
- ``model.onnx`` (``--format onnx|all``, needs ``pip install 'pspnet_jax[onnx]'``): the
  same network converted by jax2onnx, for onnxruntime.
- ``model.int8.onnx`` (``--format onnx-int8``, or ``all`` with ``--calibration``): that
  graph quantised to int8 by onnxruntime's static quantisation, calibrated on
  ``--calibration`` images (``pspnet_jax.quantize``); same input and output.
- ``export.json``: the model config, classes, palette, normalisation, the input/output
  contract, the versions that wrote it and SHA-256 checksums of the weights and files.

Contract (both artifacts): input ``image`` float32 ``[batch, height, width, 3]``, RGB on
the 0-255 scale, any batch >= 1 and any height, width >= 1 (all three symbolic; the
network has no other constraint: strides round up and the pyramid's bins may overlap);
the model's normalisation is inside. Output: ``logits`` float32 ``[batch, height, width,
classes]`` at the input size, or softmax ``probabilities``, or ``classes`` int32
``[batch, height, width]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, errors, ops, output_dir
from pspnet_jax.errors import UserError
from pspnet_jax.models import PSPNet
from pspnet_jax.palette import as_palette

FORMATS = ('stablehlo', 'onnx', 'onnx-int8')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
OUTPUTS = ('logits', 'probabilities', 'classes')
DTYPES = ('float32', 'bfloat16')
STABLEHLO_FILE, ONNX_FILE, MANIFEST = 'model.jax_exported', 'model.onnx', 'export.json'
ONNX_INT8_FILE = 'model.int8.onnx'
FILES = {'stablehlo': STABLEHLO_FILE, 'onnx': ONNX_FILE, 'onnx-int8': ONNX_INT8_FILE}
INPUT_NAME = 'image'


class ExportError(UserError):
  """An export that cannot be made as asked; says what to change."""


def serving_function(model: PSPNet, output: str = 'logits', mean=None, std=None):
  """``serve(images)``: float32 RGB 0-255 ``[B, H, W, 3]`` -> the ``output`` at input size.

  ``mean`` / ``std`` (RGB, 0-255 scale): the normalisation inside; by default the model's
  own (``model.config.mean`` / ``.std``), the one its weights were trained with.

  The model's variables are closed over, so a program traced from ``serve`` carries them
  as constants. The model runs in eval mode (BN running statistics, no dropout).
  """
  if output not in OUTPUTS:
    raise ExportError(f'--output {output!r}: choose one of {", ".join(OUTPUTS)}')
  model.eval()
  graphdef, state = nnx.split(model)
  mean = jnp.asarray(model.config.mean if mean is None else mean, jnp.float32)
  std = jnp.asarray(model.config.std if std is None else std, jnp.float32)

  def serve(images):
    logits = nnx.merge(graphdef, state)((images - mean) / std)
    if output == 'probabilities':
      return jax.nn.softmax(logits, axis=-1)
    if output == 'classes':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return logits

  return serve


def input_spec() -> jax.ShapeDtypeStruct:
  """``[batch, height, width, 3]`` float32 with all three sizes symbolic (each >= 1)."""
  b, h, w = jax.export.symbolic_shape('batch, height, width')
  return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)


def export_stablehlo(serve, platforms=('cpu', 'cuda', 'tpu')) -> jax.export.Exported:
  """``jax.export`` of ``serve`` for ``platforms`` with symbolic batch, height and width.

  Programs lowered for a GPU or TPU hold XLA's own convolutions (the CPU kernels are chosen
  per platform inside the program), so a CPU host exports for accelerators."""
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(input_spec())


def export_onnx(serve, output: str = 'logits'):
  """``serve`` as an ONNX ``ModelProto`` (jax2onnx) with dynamic batch, height and width."""
  try:
    from jax2onnx import to_onnx
  except ImportError:
    raise ExportError("ONNX export needs jax2onnx (pip install 'pspnet_jax[onnx]')") from None
  # onnx_ir warns about shape-only helper values it does not serialise; they are harmless.
  logging.getLogger('onnx_ir.serde').setLevel(logging.ERROR)
  return to_onnx(
    serve,
    [('batch', 'height', 'width', 3)],
    model_name='pspnet',
    input_names=[INPUT_NAME],
    output_names=[output],
  )


def weights_sha256(model: PSPNet) -> str:
  """SHA-256 over every parameter and BN statistic (path, dtype, shape, bytes), sorted by
  path: the same weights give the same checksum whatever wrote them."""
  digest = hashlib.sha256()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  for path, var in sorted(((('.'.join(map(str, k))), v) for k, v in flat), key=lambda kv: kv[0]):
    a = np.ascontiguousarray(np.asarray(var[...]))
    digest.update(f'{path}|{a.dtype.str}|{a.shape}|'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _with_dtype(model: PSPNet, dtype: str) -> PSPNet:
  """The same variables in a model computing in ``dtype`` (parameters stay float32)."""
  if model.config.dtype == dtype:
    return model
  config = dataclasses.replace(model.config, dtype=dtype)
  graphdef, _ = nnx.split(checkpoint.abstract_model(config))
  return nnx.merge(graphdef, nnx.state(model))


def _parse_list(text, known, what) -> tuple[str, ...]:
  items = tuple(
    t.strip() for t in (text.split(',') if isinstance(text, str) else text) if t.strip()
  )
  bad = [t for t in items if t not in known]
  if bad or not items:
    raise ExportError(f'{what} {",".join(bad) or repr(text)}: choose from {", ".join(known)}')
  return items


def export_model(
  model_dir: str,
  out: str,
  *,
  formats=('stablehlo',),
  platforms=('cpu', 'cuda', 'tpu'),
  dtype: str = 'float32',
  output: str = 'logits',
  calibration: str | None = None,
  calibration_images: int | None = None,
  crop_size: int = 473,
  data_dir: str | None = None,
  per_channel: bool = True,
) -> dict:
  """Exports the model in ``model_dir`` into ``out``; returns the manifest (``export.json``).

  ``onnx-int8`` needs ``calibration`` (``pspnet_jax.quantize.calibration_images``:
  ``calibration_images`` of them, default 100, resized to ``crop_size``).

  Every check comes before anything is written (the calibration images are read first),
  and the files are written into a temporary folder moved into place at the end: a refused
  or failed export leaves ``out`` as it was.
  """
  formats = _parse_list(formats, FORMATS, '--format')
  if 'onnx-int8' in formats and calibration is None:
    raise ExportError(
      '--format onnx-int8 needs --calibration FOLDER or dataset:NAME[:SPLIT], the images '
      'its activation ranges are measured on'
    )
  if calibration is not None and 'onnx-int8' not in formats:
    raise ExportError(
      f'--calibration is for the int8 artifact: add --format onnx-int8 (or all), or drop '
      f'--calibration (asked: --format {",".join(formats)})'
    )
  platforms = _parse_list(platforms, PLATFORMS, '--platforms')
  if dtype not in DTYPES:
    raise ExportError(f'--dtype {dtype!r}: choose one of {", ".join(DTYPES)}')
  if output not in OUTPUTS:
    raise ExportError(f'--output {output!r}: choose one of {", ".join(OUTPUTS)}')
  if {'onnx', 'onnx-int8'} & set(formats) and dtype != 'float32':
    raise ExportError(
      '--dtype bfloat16 is for the StableHLO artifact (accelerators); the ONNX '
      'artifact is float32 (onnxruntime has no bfloat16 CPU convolution): export '
      'them separately'
    )
  out = output_dir.claim(out, marker=MANIFEST, what='export')
  model = checkpoint.load_model(model_dir)
  if 'onnx-int8' in formats:
    quantize = _quantize_module()
    calibration_set, calibration_info = quantize.calibration_images(
      calibration,
      quantize.CALIBRATION_IMAGES if calibration_images is None else calibration_images,
      crop_size,
      data_dir,
    )
  metadata = checkpoint.model_metadata(model_dir)
  config = model.config
  model = _with_dtype(model, dtype)
  serve = serving_function(model, output)

  manifest = {
    'format_version': 1,
    'source': os.path.abspath(os.fspath(model_dir)),
    'model': dataclasses.replace(config, dtype=dtype).to_dict(),
    # The convolution the artifact holds where it is lowered for the CPU (ops.backend).
    'conv': ops.conv_settings(),
    'classes': checkpoint.metadata_value(metadata, 'class_names'),
    'palette': as_palette(
      checkpoint.metadata_value(metadata, 'palette'), config.num_classes
    ).tolist(),
    'normalization': {
      'mean': list(config.mean),
      'std': list(config.std),
      'formula': '(image - mean) / std, inside the artifact; image RGB 0-255',
    },
    'input': {
      'name': INPUT_NAME,
      'dtype': 'float32',
      'layout': 'NHWC',
      'shape': ['batch', 'height', 'width', 3],
      'range': 'RGB, 0-255',
      'constraints': 'batch >= 1, height >= 1, width >= 1',
    },
    'output': {
      'name': output,
      'dtype': 'int32' if output == 'classes' else 'float32',
      'shape': ['batch', 'height', 'width'] + ([] if output == 'classes' else [config.num_classes]),
      'kind': output,
    },
    'weights_sha256': weights_sha256(model),
    'versions': {p: _version(p) for p in ('pspnet_jax', 'jax', 'jaxlib', 'flax')},
    'artifacts': {},
  }
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    if 'stablehlo' in formats:
      t = time.perf_counter()
      exported = export_stablehlo(serve, platforms)
      path = os.path.join(staging, STABLEHLO_FILE)
      with open(path, 'wb') as f:
        f.write(exported.serialize())
      manifest['artifacts']['stablehlo'] = {
        'file': STABLEHLO_FILE,
        'platforms': list(exported.platforms),
        'calling_convention_version': exported.calling_convention_version,
        'sha256': _file_sha256(path),
        'bytes': os.path.getsize(path),
        'seconds': round(time.perf_counter() - t, 1),
        'load': 'jax.export.deserialize(open(file, "rb").read()).call(image)',
      }
    if 'onnx' in formats or 'onnx-int8' in formats:
      t = time.perf_counter()
      proto = export_onnx(serve, output)
      import onnx

      path = os.path.join(staging, ONNX_FILE)
      onnx.save(proto, path)
      onnx_artifact = {
        'file': ONNX_FILE,
        'opset': max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')),
        'dynamic_dims': ['batch', 'height', 'width'],
        'sha256': _file_sha256(path),
        'bytes': os.path.getsize(path),
        'seconds': round(time.perf_counter() - t, 1),
        'converter': f'jax2onnx {_version("jax2onnx")}',
        'load': 'onnxruntime.InferenceSession(file).run(None, {"image": image})',
      }
      if 'onnx' in formats:
        manifest['artifacts']['onnx'] = onnx_artifact
    if 'onnx-int8' in formats:
      t = time.perf_counter()
      int8_path = os.path.join(staging, ONNX_INT8_FILE)
      settings = quantize.quantize_onnx(path, int8_path, calibration_set, per_channel=per_channel)
      manifest['artifacts']['onnx-int8'] = {
        'file': ONNX_INT8_FILE,
        'quantization': settings,
        'calibration': calibration_info,
        'agreement_with_float': {
          'measured_on': 'the calibration images',
          **quantize.argmax_agreement(path, int8_path, calibration_set),
        },
        'float_bytes': onnx_artifact['bytes'],
        'sha256': _file_sha256(int8_path),
        'bytes': os.path.getsize(int8_path),
        'seconds': round(time.perf_counter() - t, 1),
        'load': 'onnxruntime.InferenceSession(file).run(None, {"image": image})',
      }
      if 'onnx' not in formats:
        os.remove(path)  # the float graph was the quantiser's input only
    with open(os.path.join(staging, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2)
    os.makedirs(out, exist_ok=True)
    # The manifest last: its checksums never describe files that are not yet in place.
    for name in sorted(os.listdir(staging), key=lambda n: n == MANIFEST):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
    for fmt, name in FILES.items():
      if fmt not in formats and os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))  # an earlier export's: the manifest no longer lists it
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return manifest


def _quantize_module():
  try:
    from pspnet_jax import quantize
  except ImportError:
    raise ExportError(
      "--format onnx-int8 needs onnxruntime and jax2onnx (pip install 'pspnet_jax[onnx]')"
    ) from None
  return quantize


@errors.command
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog='python -m pspnet_jax.export',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument(
    'model_dir', help='model directory, training workdir or workdir/checkpoints/<step>'
  )
  ap.add_argument('--out', required=True, help='folder to write the artifacts into')
  ap.add_argument('--format', default='stablehlo', choices=[*FORMATS, 'all'])
  ap.add_argument(
    '--platforms',
    default='cpu,cuda,tpu',
    help=f'comma-separated, for the StableHLO artifact: {",".join(PLATFORMS)}',
  )
  ap.add_argument(
    '--dtype',
    default='float32',
    choices=DTYPES,
    help='compute dtype inside the artifact (weights and outputs stay float32)',
  )
  ap.add_argument('--output', default='logits', choices=OUTPUTS)
  int8 = ap.add_argument_group('int8 (--format onnx-int8, or all with --calibration)')
  int8.add_argument(
    '--calibration',
    metavar='SRC',
    help='a folder of images, or dataset:NAME[:SPLIT] (prepared in --data-dir; split train '
    'unless named): the images the activation ranges are measured on',
  )
  int8.add_argument(
    '--calibration-images',
    type=errors.int_at_least(1),
    metavar='N',
    help='how many, spread evenly over SRC (default 100)',
  )
  int8.add_argument(
    '--crop-size',
    type=errors.int_at_least(1),
    default=473,
    help="side the calibration images are resized to: the model's crop, as in predict "
    '(default 473; the synthetic model: 96)',
  )
  int8.add_argument('--data-dir', help='where prepared datasets live (for dataset:NAME)')
  int8.add_argument(
    '--per-channel',
    dest='per_channel',
    action='store_true',
    default=True,
    help='one weight scale per output channel (default)',
  )
  int8.add_argument(
    '--per-tensor', dest='per_channel', action='store_false', help='one weight scale per tensor'
  )
  args = ap.parse_args(argv)
  if args.format == 'all':
    formats = FORMATS if args.calibration else tuple(f for f in FORMATS if f != 'onnx-int8')
  else:
    formats = (args.format,)
  manifest = export_model(
    args.model_dir,
    args.out,
    formats=formats,
    platforms=args.platforms,
    dtype=args.dtype,
    output=args.output,
    calibration=args.calibration,
    calibration_images=args.calibration_images,
    crop_size=args.crop_size,
    data_dir=args.data_dir,
    per_channel=args.per_channel,
  )
  for fmt, art in manifest['artifacts'].items():
    print(
      f'{fmt}: {os.path.join(os.path.abspath(args.out), art["file"])} ({art["bytes"] / 2**20:.1f} MiB, '
      f'{art["seconds"]} s)'
    )
  if 'onnx-int8' in manifest['artifacts']:
    art = manifest['artifacts']['onnx-int8']
    print(
      f'onnx-int8: {art["bytes"] / art["float_bytes"]:.2f}x the float file; argmax agrees with '
      f'float on {art["agreement_with_float"]["agreement"]:.2%} of the calibration pixels; '
      f'{len(art["quantization"]["float_nodes"])} nodes kept in float'
    )
  print(f'manifest: {os.path.join(os.path.abspath(args.out), MANIFEST)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
