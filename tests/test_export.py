"""Export: a semseg checkpoint ported by the CLI, exported by the CLI (StableHLO and ONNX),
then run where pspnet_jax is absent: both artifacts in a fresh process that imports only
jax, numpy and onnxruntime (no flax, pspnet_jax or torch). Both are compared with the
independent PyTorch reference on the same weights and with pspnet_jax's own forward, at
two shapes (one whose sides are not multiples of 8), within 1e-4 of max|logit|.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from cli import cli_env, one_error_line
from test_model_parity import assert_logits_close, run_torch
from test_port import run_cli, save_semseg
from torch_reference import TorchPSPNet, randomize

from pspnet_jax import checkpoint, export
from pspnet_jax.normalize import normalize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420
SHAPES = ((1, 64, 64), (2, 45, 61))  # 45 x 61: no side a multiple of 8
CLASSES = [f'class{i}' for i in range(5)]


def _env():
  return cli_env()


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.uniform(0, 255, s + (3,)).astype(np.float32) for s in SHAPES]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(torch reference, ported model dir, export dir, CLI stdout)."""
  root = tmp_path_factory.mktemp('export')
  ref = randomize(
    TorchPSPNet(num_classes=5, depth=18, base_width=8, head_channels=16, aux_channels=8), seed=3
  )
  ref.eval()
  src = save_semseg(ref, root / 'train_epoch_50.pth')
  model_dir = root / 'ported'
  run_cli(src, '--out', model_dir)
  # Classes travel from the model's metadata into the manifest.
  config, metadata = checkpoint.read_model_config(str(model_dir))
  checkpoint.write_model_config(str(model_dir), config, {**metadata, 'class_names': CLASSES})
  out = root / 'artifact'
  p = subprocess.run(
    [
      sys.executable,
      '-m',
      'pspnet_jax.export',
      str(model_dir),
      '--out',
      str(out),
      '--format',
      'all',
    ],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=REPO,
  )
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  return ref, model_dir, out, p.stdout


def _references(ref, model_dir, images):
  """Per image batch: (PyTorch reference logits, pspnet_jax forward logits), NHWC."""
  model = checkpoint.load_model(str(model_dir))
  return [(run_torch(ref, normalize(x)), np.asarray(model(normalize(x)))) for x in images]


_FRESH_PROCESS = """
import os, sys
import numpy as np
import jax
import onnxruntime
folder, inputs, outputs = sys.argv[1:]
exported = jax.export.deserialize(bytearray(open(os.path.join(folder, 'model.jax_exported'), 'rb').read()))
session = onnxruntime.InferenceSession(os.path.join(folder, 'model.onnx'), providers=['CPUExecutionProvider'])
data = np.load(inputs)
outs = {}
for k in data.files:
  outs['stablehlo_' + k] = np.asarray(exported.call(data[k]))
  outs['onnx_' + k] = session.run(None, {'image': data[k]})[0]
assert not any(m == 'flax' or m.startswith(('flax.', 'pspnet_jax', 'torch')) for m in sys.modules), \\
    sorted(m for m in sys.modules if m.startswith(('flax', 'pspnet_jax', 'torch')))
np.savez(outputs, **outs)
print('platforms', ','.join(exported.platforms))
"""


def test_both_artifacts_run_in_a_process_without_flax_or_pspnet_jax(exported, tmp_path):
  ref, model_dir, out, stdout = exported
  assert 'stablehlo:' in stdout and 'onnx:' in stdout
  images = _images()
  np.savez(tmp_path / 'in.npz', **{f'x{i}': x for i, x in enumerate(images)})
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  p = subprocess.run(
    [
      sys.executable,
      '-c',
      _FRESH_PROCESS,
      str(out),
      str(tmp_path / 'in.npz'),
      str(tmp_path / 'out.npz'),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=str(tmp_path),
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'platforms cpu,cuda,tpu' in p.stdout
  got = np.load(tmp_path / 'out.npz')
  for i, (want_torch, want_jax) in enumerate(_references(ref, model_dir, images)):
    for fmt in ('stablehlo', 'onnx'):
      assert got[f'{fmt}_x{i}'].shape == images[i].shape[:3] + (5,)
      assert_logits_close(got[f'{fmt}_x{i}'], want_torch)
      assert_logits_close(got[f'{fmt}_x{i}'], want_jax)


def test_onnx_graph_has_dynamic_batch_height_width(exported):
  import onnx

  _, _, out, _ = exported
  graph = onnx.load(str(out / export.ONNX_FILE)).graph
  (inp,), (outp,) = graph.input, graph.output
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert (inp.name, dims(inp)) == ('image', ['batch', 'height', 'width', 3])
  assert outp.name == 'logits' and dims(outp)[3] == 5


def test_manifest_describes_the_artifacts(exported):
  _, model_dir, out, _ = exported
  manifest = json.load(open(out / export.MANIFEST))
  assert manifest['classes'] == CLASSES and len(manifest['palette']) == 5
  assert manifest['model']['depth'] == 18 and manifest['model']['num_classes'] == 5
  np.testing.assert_allclose(
    manifest['normalization']['mean'], [123.675, 116.28, 103.53], rtol=1e-6
  )
  np.testing.assert_allclose(manifest['normalization']['std'], [58.395, 57.12, 57.375], rtol=1e-6)
  assert manifest['input']['shape'] == ['batch', 'height', 'width', 3]
  assert manifest['output'] == {
    'name': 'logits',
    'dtype': 'float32',
    'kind': 'logits',
    'shape': ['batch', 'height', 'width', 5],
  }
  assert manifest['versions']['jax'] and manifest['versions']['pspnet_jax']
  assert manifest['conv']['backend'] in ('auto', 'xla')  # what the CPU lowering holds
  for art in manifest['artifacts'].values():
    import hashlib

    assert hashlib.sha256(open(out / art['file'], 'rb').read()).hexdigest() == art['sha256']
  # The weights' checksum is that of the model directory's variables, recomputed here
  # from the arrays themselves.
  import hashlib

  from flax import nnx

  model = checkpoint.load_model(str(model_dir))
  digest = hashlib.sha256()
  flat = {
    '.'.join(map(str, k)): np.asarray(v[...])
    for k, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  }
  for k in sorted(flat):
    a = np.ascontiguousarray(flat[k])
    digest.update(f'{k}|{a.dtype.str}|{a.shape}|'.encode() + a.tobytes())
  assert manifest['weights_sha256'] == digest.hexdigest()


def test_the_serving_function_normalises_with_the_models_own_mean_and_std():
  import dataclasses

  import jax.numpy as jnp
  from flax import nnx
  from tiny_models import tiny_model

  model = tiny_model(seed=2)
  config = dataclasses.replace(model.config, mean=(123.68, 116.779, 103.939), std=(1.0, 2.0, 4.0))
  caffe_like = nnx.merge(nnx.split(checkpoint.abstract_model(config))[0], nnx.state(model))
  caffe_like.eval()
  x = _images()[0]
  got = export.serving_function(caffe_like)(jnp.asarray(x))
  want = caffe_like(jnp.asarray(normalize(x, config.mean, config.std)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_class_ids_and_probabilities_outputs(exported):
  """The function API: ``classes`` is the argmax of the logits, ``probabilities`` sum to 1."""
  ref, model_dir, _, _ = exported
  model = checkpoint.load_model(str(model_dir))
  x = _images(seed=2)[1]
  want = run_torch(ref, normalize(x))
  classes = export.export_stablehlo(export.serving_function(model, 'classes'), ['cpu']).call(x)
  probs = export.export_stablehlo(export.serving_function(model, 'probabilities'), ['cpu']).call(x)
  assert classes.dtype == np.int32 and classes.shape == x.shape[:3]
  second, first = np.sort(want, axis=-1)[..., -2:].transpose(3, 0, 1, 2)
  clear = first - second > 1e-3 * np.abs(want).max()  # pixels whose argmax float error cannot flip
  np.testing.assert_array_equal(np.asarray(classes)[clear], want.argmax(-1)[clear])
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  # A softmax moves by at most the largest change of its logits: the logits' tolerance.
  np.testing.assert_allclose(
    np.asarray(probs),
    torch.softmax(torch.from_numpy(want), -1).numpy(),
    atol=1e-4 * np.abs(want).max(),
  )


def _module(*args):
  """``python -m ARGS`` from the repository, finished."""
  return subprocess.run(
    [sys.executable, '-m', *args],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    cwd=REPO,
  )


def test_bad_model_dir_and_bad_options_are_one_line_and_write_nothing(exported, tmp_path):
  _, model_dir, _, _ = exported
  cases = [
    ([str(tmp_path / 'nowhere')], 'no such directory'),
    ([str(tmp_path)], 'not a pspnet_jax model directory'),
    (
      [str(model_dir), '--platforms', 'cpu,gpu'],
      '--platforms gpu: choose from cpu, cuda, rocm, tpu',
    ),
    ([str(model_dir), '--format', 'onnx', '--dtype', 'bfloat16'], 'the ONNX artifact is float32'),
  ]
  for args, needle in cases:
    out = tmp_path / 'out'
    one_error_line(_module('pspnet_jax.export', *args, '--out', str(out)), needle)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.export-')]


def test_an_out_that_is_a_file_or_holds_other_files_is_refused_by_export_and_port(
  exported, tmp_path
):
  """pspnet_jax.output_dir at the CLI: export and port refuse, before any work, an --out
  that is a file or a folder of the user's other files; both are left as they were."""
  _, model_dir, _, _ = exported
  a_file = tmp_path / 'model.onnx'
  a_file.write_text('mine')
  others = tmp_path / 'mine'
  others.mkdir()
  (others / 'notes.txt').write_text('keep')
  cases = [
    (['pspnet_jax.export', str(model_dir)], a_file, f'--out {a_file} is a file, not a folder'),
    (['pspnet_jax.export', str(model_dir)], others, 'holds other files and no earlier export'),
    (
      ['pspnet_jax.port', str(tmp_path / 'any.pth')],
      others,
      'holds other files and no earlier model directory',
    ),
  ]
  for command, out, needle in cases:
    one_error_line(_module(*command, '--out', str(out)), needle)
  assert a_file.read_text() == 'mine' and os.listdir(others) == ['notes.txt']


def test_bfloat16_export_computes_in_bfloat16_and_stays_close(exported, tmp_path):
  """``--dtype bfloat16``: the program's convolutions run in bfloat16 (so its logits
  differ from float32's by more than float32 rounding, but by little), its input and
  output stay float32, and the manifest says so."""
  ref, model_dir, _, _ = exported
  manifest = export.export_model(
    str(model_dir), tmp_path / 'bf16', platforms=['cpu'], dtype='bfloat16'
  )
  assert manifest['model']['dtype'] == 'bfloat16' and list(manifest['artifacts']) == ['stablehlo']
  program = jax.export.deserialize(
    bytearray(open(tmp_path / 'bf16' / export.STABLEHLO_FILE, 'rb').read())
  )
  assert 'bf16' in program.mlir_module()
  x = _images(seed=3)[0]
  got = np.asarray(program.call(x))
  want = run_torch(ref, normalize(x))
  assert got.dtype == np.float32 and np.all(np.isfinite(got))
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert 1e-4 < rel < 5e-2, rel
