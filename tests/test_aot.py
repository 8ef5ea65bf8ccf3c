"""python -m pspnet_jax.aot on tiny models, compiled on this CPU for a TPU v5e 2x2 slice, and
its HLO collective parser on hand-written HLO.

The compile needs libtpu, which the main test environment does not hold (with it every
process start probes for a TPU); ``make test`` builds a second environment with
``pip install -e .[aot]`` and names its Python in ``PSPNET_AOT_PYTHON``."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from pspnet_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_PYTHON = os.environ.get('PSPNET_AOT_PYTHON') or (
    sys.executable if importlib.util.find_spec('libtpu') else None)
needs_libtpu = pytest.mark.skipif(
    AOT_PYTHON is None, reason="libtpu is not installed (pip install -e '.[aot]' in an "
    'environment and point PSPNET_AOT_PYTHON at its python)')
TINY = ['--config.dataset.builder_kwargs.image_size=32', '--config.model.base_width=8',
        '--config.model.head_channels=16', '--config.model.aux_channels=8',
        '--config.augment.crop_size=33', '--config.model.dtype=bfloat16']


def _aot(tmp_path, *args):
  out = tmp_path / 'aot.json'
  cmd = [AOT_PYTHON, '-m', 'pspnet_jax.aot', '--config', os.path.join(ROOT, 'configs', 'synthetic.py'),
         '--target', 'tpu:v5e:2x2', '--json', str(out), *TINY, *args]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.aot
@needs_libtpu
def test_train_step_compiles_for_v5e_with_per_chip_figures(tmp_path):
  r = _aot(tmp_path, '--program=train', '--config.global_batch_size=8')
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


@pytest.mark.aot
@needs_libtpu
def test_eval_program_compiles_for_v5e(tmp_path):
  r = _aot(tmp_path, '--program=eval', '--image_size=40x56', '--config.eval.mode=slide',
           '--config.eval.crop_size=33', '--config.eval.base_size=48')
  assert r['chips'] == 4 and r['window_batch'] == 4  # one window per chip
  assert r['window_batches_per_scale'] == [1]  # 34x48 -> 33x48 padded: 1x2 windows, 1 batch
  assert r['per_chip']['memory_gib']['fits'] and r['per_chip']['flops'] > 0


def test_collectives_are_counted_once_with_dtype_and_elements():
  hlo = '''HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %g = f32[4]{0} get-tuple-element(%p), index=1
  %ar = f32[4]{0} all-reduce(%g), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%c, %ar)
}

ENTRY %main (a: bf16[8,16], b: f32[3]) -> f32[3] {
  %a = bf16[8,16]{1,0:T(8,128)(2,1)} parameter(0)
  %b = f32[3]{0} parameter(1)
  %s = bf16[8,16]{1,0} all-reduce-start(%a), replica_groups=[1,4]<=[4], to_apply=%add
  %d = bf16[8,16]{1,0} all-reduce-done(%s)
  %c = (f32[3]{0}, bf16[8,16]{1,0}) all-reduce(%b, %d), replica_groups={{0,1},{2,3}}, to_apply=%add
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %x = f32[12]{0} all-gather(%b), dimensions={0}, replica_groups={{0,1,2,3}}
}
'''
  got = aot.collectives(hlo, num_devices=4)
  key = lambda c: (c['op'], c['dtype'], c['elements'], c['group'], c['in_loop'])
  assert sorted(map(key, got)) == sorted([
      ('all-reduce', 'f32', 4, 4, True),        # in the while body
      ('all-reduce', 'bf16', 128, 4, False),    # the -start, not the -done
      ('all-reduce', 'f32', 3, 2, False),       # a combined all-reduce: one entry per dtype
      ('all-reduce', 'bf16', 128, 2, False),
      ('all-gather', 'f32', 3, 4, False)])      # operand elements
  assert [c['bytes'] for c in got if c['dtype'] == 'bf16'] == [256, 256]


def test_bad_target_is_one_clear_error():
  with pytest.raises(aot.AotError, match='tpu:GENERATION:TOPOLOGY'):
    aot.parse_target('gpu:h100')
