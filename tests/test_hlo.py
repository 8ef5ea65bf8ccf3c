"""The HLO reader (``pspnet_jax.hlo``) on hand-written optimised HLO: collectives, and the
HBM traffic audit's rules, each on a program whose traffic is counted here by hand."""

import pytest

from pspnet_jax import hlo

MiB = 2**20


def test_collectives_are_counted_once_with_dtype_and_elements():
  text = """HloModule m

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
"""
  got = hlo.collectives(text, num_devices=4)
  key = lambda c: (c['op'], c['dtype'], c['elements'], c['group'], c['in_loop'])
  assert sorted(map(key, got)) == sorted(
    [
      ('all-reduce', 'f32', 4, 4, True),  # in the while body
      ('all-reduce', 'bf16', 128, 4, False),  # the -start, not the -done
      ('all-reduce', 'f32', 3, 2, False),  # a combined all-reduce: one entry per dtype
      ('all-reduce', 'bf16', 128, 2, False),
      ('all-gather', 'f32', 3, 4, False),
    ]
  )  # operand elements
  assert [c['bytes'] for c in got if c['dtype'] == 'bf16'] == [256, 256]


@pytest.mark.parametrize(
  'shape,raw,padded',
  [
    ('f32[1000,100]{1,0:T(8,128)}', 1000 * 100 * 4, 1000 * 128 * 4),  # minor dim to 128
    ('f32[1000,100]{0,1:T(8,128)}', 1000 * 100 * 4, 1024 * 104 * 4),  # transposed layout
    ('bf16[4,60,60,150]{3,0,2,1:T(4,128)}', 4 * 60 * 60 * 150 * 2, 4 * 60 * 60 * 256 * 2),
    ('f32[3]{0:T(128)}', 12, 512),
    ('s32[]{:T(128)}', 4, 512),  # a tiled scalar
    ('f32[7,9]', 7 * 9 * 4, 7 * 9 * 4),  # no layout: no padding
  ],
)
def test_tile_padding(shape, raw, padded):
  (a,) = hlo.parse_arrays(shape)
  assert (a.nbytes, a.padded_nbytes) == (raw, padded)


def test_memory_spaces():
  arrays = hlo.parse_arrays(
    '(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)})'
  )
  assert [a.in_hbm for a in arrays] == [False, True, False]


def _traffic(body: str, extra: str = '', **kw) -> dict:
  return hlo.hbm_traffic(f'HloModule m\n\n{extra}\nENTRY %main () -> f32[] {{\n{body}\n}}\n', **kw)


FUSED_ADD = """%add_computation (p0: f32[1024,1024], p1: f32[1024,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %p1 = f32[1024,1024]{1,0} parameter(1)
  ROOT %a = f32[1024,1024]{1,0} add(%p0, %p1)
}
"""


def test_an_elementwise_fusion_reads_its_operands_and_writes_its_result():
  t = _traffic(
    """  %x = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  %y = f32[1024,1024]{1,0:T(8,128)} parameter(1)
  ROOT %f = f32[1024,1024]{1,0:T(8,128)} fusion(%x, %y), kind=kLoop, calls=%add_computation""",
    FUSED_ADD,
  )
  assert t['bytes'] == t['bytes_padded'] == 12 * MiB
  assert t['by_kind'] == {
    'elementwise fusion': {'bytes': 12 * MiB, 'bytes_padded': 12 * MiB, 'count': 1}
  }


def test_vmem_buffers_are_not_hbm_traffic():
  t = _traffic(
    """  %x = f32[1024,1024]{1,0:T(8,128)S(1)} parameter(0)
  %y = f32[1024,1024]{1,0:T(8,128)} parameter(1)
  ROOT %f = f32[1024,1024]{1,0:T(8,128)S(1)} fusion(%x, %y), kind=kLoop, calls=%add_computation""",
    FUSED_ADD,
  )
  assert t['bytes'] == 4 * MiB  # only %y is read from HBM


def test_an_async_copy_counts_once_its_read_and_its_write():
  t = _traffic("""  %x = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  %s = (f32[1024,1024]{1,0:T(8,128)S(1)}, f32[1024,1024]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x)
  %d = f32[1024,1024]{1,0:T(8,128)S(1)} copy-done(%s)
  %h = (f32[1024,1024]{1,0:T(8,128)}, f32[1024,1024]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%d)
  ROOT %e = f32[1024,1024]{1,0:T(8,128)} copy-done(%h)""")
  # HBM -> VMEM reads 4 MiB of HBM; VMEM -> HBM writes 4 MiB: 8 MiB, not 4 x 4.
  assert t['bytes'] == 8 * MiB and t['by_kind']['async copy']['count'] == 2


def test_a_slice_counts_the_slice_it_reads():
  t = _traffic("""  %x = f32[64,1024,1024]{2,1,0:T(8,128)} parameter(0)
  %i = s32[]{:T(128)S(6)} parameter(1)
  %z = s32[]{:T(128)S(6)} constant(0)
  ROOT %s = f32[1,1024,1024]{2,1,0:T(8,128)} dynamic-slice(%x, %i, %z, %z), dynamic_slice_sizes={1,1024,1024}""")
  assert t['bytes'] == 8 * MiB and t['by_kind']['slice']['count'] == 1


def test_a_fused_slice_and_an_in_place_update_count_their_slices():
  computations = """%slice_computation (p0: f32[64,1024,1024], p1: s32[]) -> f32[1,1024,1024] {
  %p0 = f32[64,1024,1024]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  %ds = f32[1,1024,1024]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,1024,1024}
  ROOT %m = f32[1,1024,1024]{2,1,0} multiply(%ds, %ds)
}

%update_computation (p0: f32[64,1024,1024], p1: f32[1,1024,1024], p2: s32[]) -> f32[64,1024,1024] {
  %p0 = f32[64,1024,1024]{2,1,0} parameter(0)
  %p1 = f32[1,1024,1024]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  %n = f32[1,1024,1024]{2,1,0} negate(%p1)
  ROOT %u = f32[64,1024,1024]{2,1,0} dynamic-update-slice(%p0, %n, %p2, %c, %c)
}
"""
  t = _traffic(
    """  %x = f32[64,1024,1024]{2,1,0:T(8,128)} parameter(0)
  %i = s32[]{:T(128)S(6)} parameter(1)
  %s = f32[1,1024,1024]{2,1,0:T(8,128)} fusion(%x, %i), kind=kLoop, calls=%slice_computation
  ROOT %u = f32[64,1024,1024]{2,1,0:T(8,128)} fusion(%x, %s, %i), kind=kLoop, calls=%update_computation""",
    computations,
  )
  # slice: read 4 MiB, write 4 MiB; update in place: read the 4 MiB update, write 4 MiB.
  assert t['bytes'] == 16 * MiB


def test_a_loop_body_counts_once_per_trip():
  computations = (
    """%cond (p: (s32[], f32[1024,1024])) -> pred[] {
  %p = (s32[], f32[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[1024,1024])) -> (s32[], f32[1024,1024]) {
  %p = (s32[], f32[1024,1024]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %x = f32[1024,1024]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %y = f32[1024,1024]{1,0:T(8,128)} fusion(%x, %x), kind=kLoop, calls=%add_computation
  ROOT %t = (s32[], f32[1024,1024]{1,0}) tuple(%i, %y)
}

%dcond (p: (s32[], f32[1024,1024])) -> pred[] {
  %p = (s32[], f32[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
"""
    + FUSED_ADD
  )
  body = """  %zero = s32[]{:T(128)} constant(0)
  %start = s32[]{:T(128)} copy(%zero)
  %x = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  %init = (s32[], f32[1024,1024]{1,0}) tuple(%start, %x)
  %w = (s32[], f32[1024,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %v = (s32[], f32[1024,1024]{1,0}) while(%w), condition=%dcond, body=%body"""
  t = _traffic(body, computations, unknown_trips=3)
  # 12 MiB a trip (read 4 MiB twice, write 4 MiB), 5 trips + 3 assumed for the
  # data-dependent loop; and the counter's copy, 4 bytes read and 4 written.
  assert t['bytes'] == (5 + 3) * 12 * MiB + 8
  assert [(l['trips'], l['known']) for l in t['loops']] == [(5, True), (3, False)]


def test_a_fused_slice_behind_a_bitcast_counts_its_slice():
  computations = """%slice_computation (p0: f32[64,1024,1024], p1: s32[]) -> f32[1,1024,1024] {
  %p0 = f32[64,1024,1024]{2,1,0} parameter(0)
  %b = f32[64,1024,1024,1]{3,2,1,0} bitcast(%p0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  %ds = f32[1,1024,1024,1]{3,2,1,0} dynamic-slice(%b, %p1, %c, %c, %c), dynamic_slice_sizes={1,1024,1024,1}
  ROOT %r = f32[1,1024,1024]{2,1,0} bitcast(%ds)
}
"""
  t = _traffic(
    """  %x = f32[64,1024,1024]{2,1,0:T(8,128)} parameter(0)
  %i = s32[]{:T(128)S(6)} parameter(1)
  ROOT %s = f32[1,1024,1024]{2,1,0:T(8,128)} fusion(%x, %i), kind=kLoop, calls=%slice_computation""",
    computations,
  )
  assert t['bytes'] == 8 * MiB


def test_a_conditional_counts_its_costlier_branch():
  computations = (
    FUSED_ADD
    + """
%small (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  ROOT %n = f32[1024,1024]{1,0:T(8,128)S(1)} negate(%p)
}

%large (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  ROOT %f = f32[1024,1024]{1,0:T(8,128)} fusion(%p, %p), kind=kLoop, calls=%add_computation
}
"""
  )
  t = _traffic(
    """  %x = f32[1024,1024]{1,0:T(8,128)} parameter(0)
  %i = s32[]{:T(128)S(6)} parameter(1)
  ROOT %c = f32[1024,1024]{1,0:T(8,128)} conditional(%i, %x, %x), branch_computations={%small, %large}""",
    computations,
  )
  # small: read 4 MiB (its result stays in VMEM); large: read 8 MiB, write 4 MiB.
  assert t['bytes'] == 12 * MiB
