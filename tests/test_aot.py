"""python -m pspnet_jax.aot on tiny models, compiled on this CPU for a TPU v5e 2x2 slice: the
per-chip figures, the HBM traffic audit on programs whose traffic is known by hand,
``--breakdown`` and ``--sweep``. (The HLO reader's rules on hand-written HLO:
tests/test_hlo.py.)

The compile needs libtpu, which the main test environment does not hold (with it every
process start probes for a TPU); ``make test`` builds a second environment with
``pip install -e .[aot]`` and names its Python in ``PSPNET_AOT_PYTHON``."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from pspnet_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_PYTHON = os.environ.get('PSPNET_AOT_PYTHON') or (
  sys.executable if importlib.util.find_spec('libtpu') else None
)
needs_libtpu = pytest.mark.skipif(
  AOT_PYTHON is None,
  reason="libtpu is not installed (pip install -e '.[aot]' in an "
  'environment and point PSPNET_AOT_PYTHON at its python)',
)
TINY = [
  '--config.dataset.builder_kwargs.image_size=32',
  '--config.model.base_width=8',
  '--config.model.head_channels=16',
  '--config.model.aux_channels=8',
  '--config.augment.crop_size=33',
  '--config.model.dtype=bfloat16',
]


def _env():
  return dict(
    os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
  )


def _aot(tmp_path, *args, stdout=False):
  out = tmp_path / 'aot.json'
  cmd = [
    AOT_PYTHON,
    '-m',
    'pspnet_jax.aot',
    '--config',
    os.path.join(ROOT, 'configs', 'synthetic.py'),
    '--target',
    'tpu:v5e:2x2',
    '--json',
    str(out),
    *TINY,
    *args,
  ]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
  return (json.loads(out.read_text()), p.stdout) if stdout else json.loads(out.read_text())


@pytest.mark.aot
@needs_libtpu
def test_train_step_compiles_for_v5e_with_per_chip_figures(tmp_path):
  r, printed = _aot(
    tmp_path,
    '--program=train',
    '--config.global_batch_size=8',
    '--breakdown=5',
    '--config.loss_block_rows=8',
    stdout=True,
  )
  assert r['chips'] == 4 and r['device_kind'].startswith('TPU v5')
  m = r['per_chip']
  mem = m['memory_gib']
  assert 0 < mem['arguments'] < mem['total'] <= mem['peak'] < mem['hbm'] and mem['fits']
  assert r['convolutions_in_program'] > 0  # XLA's convolutions: no CPU kernels for TPU
  # Gradients and BN statistics are reduced across the 4 chips in float32, never bf16.
  reduced = {c['dtype'] for c in m['collectives'] if c['op'] == 'all-reduce'}
  assert 'f32' in reduced and 'bf16' not in reduced, m['collective_summary']
  assert sum(c['elements'] for c in m['collectives'] if c['dtype'] == 'f32') > 10_000  # gradients
  bound = m['roofline_seconds']
  assert bound['bound'] == max(bound['compute'], bound['memory'], bound['interconnect']) > 0
  assert r['images_per_second_upper_bound'] == pytest.approx(8 / bound['bound'])
  assert 0 < m['mfu_upper_bound'] <= 1
  # The memory term is the audited traffic, tile-padded; XLA's own count stays beside it.
  traffic = m['hbm_traffic']
  assert 0 < traffic['bytes'] <= traffic['bytes_padded'] < m['xla_bytes_accessed']
  assert bound['memory'] == pytest.approx(traffic['bytes_padded'] / r['chip']['hbm_bytes_per_s'])
  assert sum(g['bytes_padded'] for g in traffic['by_kind'].values()) == pytest.approx(
    traffic['bytes_padded']
  )
  assert sum(g['bytes_padded'] for g in traffic['by_source'].values()) == pytest.approx(
    traffic['bytes_padded']
  )
  assert (
    len(traffic['top']) == 10
    and traffic['top'][0]['bytes_padded'] >= traffic['top'][-1]['bytes_padded']
  )
  # The loss is taken at the logits' resolution: two loops (forward, backward) per head
  # over the 33 rows in blocks of 8 (5 trips), and no gather reads full-resolution logits.
  assert [l['trips'] for l in traffic['loops']].count(5) == 4 and all(
    l['known'] for l in traffic['loops']
  )
  assert 'gather' not in traffic['by_kind'], traffic['by_kind']
  assert (
    'HBM traffic per chip' in printed and 'by kind' in printed and 'top 5 instructions' in printed
  )


@pytest.mark.aot
@needs_libtpu
def test_eval_program_compiles_for_v5e(tmp_path):
  r = _aot(
    tmp_path,
    '--program=eval',
    '--image_size=40x56',
    '--config.eval.mode=slide',
    '--config.eval.crop_size=33',
    '--config.eval.base_size=48',
  )
  # eval.py's program on a slice: one image a chip, one window (and its flip) a call.
  assert r['chips'] == 4 and r['images_per_step'] == 4 and r['windows_per_call_per_chip'] == 1
  assert r['window_batches_per_scale'] == [4]  # 34x48: 2x2 windows of 33, one a call
  # Only confusion counts cross between chips: no window's probabilities, no canvas.
  c = r['num_classes']
  colls = r['per_chip']['collectives']
  assert colls and all(x['op'] == 'all-reduce' and x['dtype'] == 's32' for x in colls), colls
  assert sum(x['elements'] for x in colls) <= c * c
  assert r['per_chip']['memory_gib']['fits'] and r['per_chip']['flops'] > 0


@pytest.mark.aot
@needs_libtpu
def test_distilled_train_step_compiles_for_v5e(tmp_path):
  """With --config.distill.teacher the slice's step runs the teacher too: its convolutions
  join the student's (forward only: the student has 3 a layer, forward and two gradients),
  its weights are replicated arguments; only the teacher's model_config.json is read."""
  import shutil

  from tiny_models import tiny_model

  from pspnet_jax import checkpoint
  from pspnet_jax.models import PSPNetConfig

  config = PSPNetConfig(depth=18, base_width=16, num_classes=4, head_channels=16, aux_channels=8)
  teacher = checkpoint.save_model(tmp_path / 'teacher', tiny_model(config))
  shutil.rmtree(os.path.join(teacher, 'state'))  # its weights are not needed to compile
  args = ('--program=train', '--config.global_batch_size=8')
  plain = _aot(tmp_path, *args)
  r = _aot(tmp_path, *args, f'--config.distill.teacher={teacher}')
  assert r['chips'] == 4 and r['per_chip']['memory_gib']['fits']
  assert r['convolutions_in_program'] > plain['convolutions_in_program']
  grown = r['per_chip']['memory_gib']['arguments'] - plain['per_chip']['memory_gib']['arguments']
  params = sum(
    np.prod(x.shape) for x in jax.tree.leaves(nnx.state(checkpoint.abstract_model(config)))
  )
  assert grown * 2**30 >= 4 * params  # at least the teacher's float32 variables


@pytest.mark.aot
@needs_libtpu
def test_sweep_compiles_one_program_per_value(tmp_path):
  r, printed = _aot(tmp_path, '--program=train', '--sweep=global_batch_size=4,16', stdout=True)
  small, large = r['rows']
  assert (r['sweep'], small['global_batch_size'], large['global_batch_size']) == (
    'global_batch_size',
    4,
    16,
  )
  # (Peak memory need not grow with the batch on a tiny model: the compiler keeps more of
  # it in VMEM at one size than at another.)
  assert small['fits'] and large['fits'] and small['hbm_traffic_gb'] < large['hbm_traffic_gb']
  assert small['images_per_second_upper_bound'] > 0 and large['mfu_upper_bound'] > 0
  for row, result in zip(r['rows'], r['results']):
    assert result['images_per_step'] == row['global_batch_size']
    assert row['bound_ms'] == pytest.approx(result['per_chip']['roofline_seconds']['bound'] * 1e3)
  assert '| global_batch_size | gib_per_chip |' in printed and printed.count('\n| ') >= 3


@pytest.mark.aot
@needs_libtpu
def test_traffic_audit_on_programs_known_by_hand():
  p = subprocess.run(
    [AOT_PYTHON, os.path.join(ROOT, 'tests', 'scripts', 'aot_traffic.py')],
    capture_output=True,
    text=True,
    timeout=900,
    env=_env(),
    cwd=ROOT,
  )
  assert p.returncode == 0, p.stderr[-4000:]
  r = json.loads(p.stdout)
  MiB = 2**20
  # x * 2 + 1 on f32[1024, 1024]: read 4 MiB, write 4 MiB.
  assert r['elementwise']['bytes_padded'] == 8 * MiB
  # bf16 [512, 1024] @ [1024, 2048]: read 1 + 4 MiB, write 2 MiB; XLA counts the weights'
  # prefetch into VMEM (an async copy) as well as the matmul reading them from VMEM.
  assert r['matmul']['bytes_padded'] == 7 * MiB < r['matmul']['xla_bytes_accessed']
  assert r['matmul']['vmem_buffers'] > 0
  # One [1024, 1024] slice of a 256 MiB array, doubled: read 4 MiB, write 4 MiB (+ the index).
  assert 8 * MiB <= r['slice']['bytes_padded'] < 8 * MiB + 4096
  # f32[1000, 100]: tiles of (8, 128) pad the minor 100 (or 1000) up: more than the raw bytes.
  assert r['padded']['bytes'] == 2 * 1000 * 100 * 4 < r['padded']['bytes_padded']
  # Five trips of sin(x) * 2 in VMEM: x in, the result out, the trips never touch HBM;
  # XLA's count holds the VMEM buffers.
  loop = r['loop_in_vmem']
  assert loop['loops'] == [[5, True]] and 8 * MiB <= loop['bytes_padded'] < 8 * MiB + 65536
  assert loop['xla_bytes_accessed'] > 4 * loop['bytes_padded']
  # The loss at the logits' resolution moves a hundredth of what the composition does, and
  # has no gather.
  assert r['loss_fused']['bytes_padded'] * 100 < r['loss_plain']['bytes_padded']
  assert 'gather' in r['loss_plain']['by_kind'] and 'gather' not in r['loss_fused']['by_kind']


def test_sweep_values_take_the_key_type_and_bad_ones_are_one_line():
  from configs.synthetic import get_config

  config = get_config()
  assert aot.parse_sweep(config, 'global_batch_size=8,16') == ('global_batch_size', [8, 16])
  assert aot.parse_sweep(config, 'model.dtype=float32,bfloat16') == (
    'model.dtype',
    ['float32', 'bfloat16'],
  )
  assert aot.with_value(config, 'model.dtype', 'bfloat16').model.dtype == 'bfloat16'
  assert config.model.dtype == 'float32'  # a copy
  with pytest.raises(
    aot.AotError, match="unknown config key 'global_batch' .*did you mean global_batch_size"
  ):
    aot.parse_sweep(config, 'global_batch=8')
  with pytest.raises(aot.AotError, match="unknown config key 'model.dtyp'"):
    aot.parse_sweep(config, 'model.dtyp=bfloat16')
  with pytest.raises(aot.AotError, match="'eight' is not of type int"):
    aot.parse_sweep(config, 'global_batch_size=8,eight')
  with pytest.raises(aot.AotError, match='expected KEY=V1,V2'):
    aot.parse_sweep(config, 'global_batch_size')


def test_bad_target_is_one_clear_error():
  with pytest.raises(aot.AotError, match='tpu:GENERATION:TOPOLOGY'):
    aot.parse_target('gpu:h100')


def test_aot_lowers_exactly_the_step_the_training_loop_runs(tmp_path, monkeypatch):
  """The loop and the AOT tool both build the step with train.state.create_trainer: the
  step train_and_evaluate ran, lowered for the arguments it was called with, is the text
  aot.lower_train gives for the same config (a drift in any argument, the ignore label,
  accumulation, the loss's blocks, the schedule, the shardings, would show here)."""
  import dataclasses

  import jax

  from configs.synthetic import get_config
  from pspnet_jax.train import loop

  config = get_config()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.builder_kwargs.update(image_size=32, num_train=8, num_val=2)
  config.model.update(base_width=8, head_channels=16, aux_channels=8)
  config.augment.crop_size = config.eval.crop_size = 33
  config.eval.base_size = 32
  config.update(
    global_batch_size=2, num_steps=1, eval_every_steps=0, grad_accum_steps=2, loss_block_rows=8
  )
  seen = {}
  create = loop.create_trainer

  def recording(*args, **kwargs):
    trainer = create(*args, **kwargs)

    def step(state, batch):
      seen.setdefault(
        'args',
        jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch)
        ),
      )
      return trainer.step(state, batch)

    seen['trainer'] = trainer
    return dataclasses.replace(trainer, step=step)

  monkeypatch.setattr(loop, 'create_trainer', recording)
  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  ran = seen['trainer'].step.trace(*seen['args']).lower().as_text()
  lowered, info = aot.lower_train(config, jax.devices(), num_classes=4)
  assert info['loop_trips'] == 2 and lowered.as_text() == ran
  config.loss_block_rows = 4  # and the comparison can fail
  assert aot.lower_train(config, jax.devices(), num_classes=4)[0].as_text() != ran
