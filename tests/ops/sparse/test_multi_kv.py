"""dtk.multi_kv_attention: C++ CPU kernel against the float64 reference, semantics, errors, opcheck."""
import pytest
import torch

import dtk
from dtk.ops.sparse.reference import merge_lse, multi_kv_attention_reference as ref

from ...helpers import assert_matches_reference, bshd
from .cases import random_kv_index, random_q_index, segments


def _d(ts):
    return None if ts is None else [None if t is None else t.double() for t in ts]


def check(q, ks, vs, **kw):
    out, lse = dtk.multi_kv_attention(q, ks, vs, return_lse=True, **kw)
    r64, l64 = ref(q.double(), _d(ks), _d(vs), **kw)
    rlo, _ = ref(q, ks, vs, **kw)
    assert_matches_reference(out, r64, rlo)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin].double() - l64[fin]).abs().max().item() <= 1e-4 if fin.any() else True
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_sweep(dtype):
    for trial in range(12):
        g = torch.Generator().manual_seed(trial)
        B = int(torch.randint(1, 3, (1,), generator=g))
        Hkv = [1, 2][trial % 2]
        H = Hkv * [1, 2, 3][trial % 3]
        D = [8, 16, 40][trial % 3]
        nseg = 1 + trial % 5
        lens = [int(x) for x in torch.randint(0, 40, (nseg,), generator=g)]
        if trial % 4 == 0:
            lens[0] = 0                      # empty segment
        S = int(torch.randint(1, 50, (1,), generator=g))
        tr = trial % 2 == 1
        q = bshd(B, S, H, D, dtype, transposed=tr)
        ks, vs = segments(B, lens, Hkv, D, dtype, transposed=tr)
        kv_index = None
        if trial % 3 == 0:
            kv_index = [None if i % 2 else random_kv_index(B, L, 7, per_batch=i % 4 == 0) for i, L in enumerate(lens)]
        q_index = random_q_index(B, S, [0, 3, S][trial % 3]) if trial % 2 == 0 else None
        check(q, ks, vs, kv_index=kv_index, q_index=q_index, scale=0.3 if trial % 5 == 0 else None)


def test_equals_attention_over_concatenation():
    q = bshd(2, 24, 4, 16, torch.float64)
    ks, vs = segments(2, [13, 29], 2, 16, torch.float64)
    out = dtk.multi_kv_attention(q, ks, vs)
    whole = dtk.multi_kv_attention(q, [torch.cat(ks, 1)], [torch.cat(vs, 1)])
    torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
    sd = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), torch.cat(ks, 1).repeat_interleave(2, 2).transpose(1, 2),
        torch.cat(vs, 1).repeat_interleave(2, 2).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, sd, rtol=1e-10, atol=1e-10)


def test_lse_merges_halves_exactly():
    q = bshd(1, 17, 2, 16, torch.float64)
    ks, vs = segments(1, [20, 9, 14], 2, 16, torch.float64)
    o1, l1 = dtk.multi_kv_attention(q, ks[:1], vs[:1], return_lse=True)
    o2, l2 = dtk.multi_kv_attention(q, ks[1:], vs[1:], return_lse=True)
    o, l = dtk.multi_kv_attention(q, ks, vs, return_lse=True)
    mo, ml = merge_lse([o1, o2], [l1, l2])
    torch.testing.assert_close(mo, o, rtol=1e-5, atol=1e-6)   # lse is float32
    torch.testing.assert_close(ml, l.double(), rtol=1e-6, atol=1e-6)


def test_out_rows_outside_q_index_untouched():
    B, S, H, D = 2, 30, 2, 16
    q = bshd(B, S, H, D, torch.float32)
    ks, vs = segments(B, [11, 23], 1, D, torch.float32)
    qi = random_q_index(B, S, 9)
    out = torch.randn(B, S, H, D)
    before = out.clone()
    res = dtk.multi_kv_attention(q, ks, vs, q_index=qi, out=out)
    assert res is out
    touched = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        touched[b, qi[b][qi[b] >= 0]] = True
    assert torch.equal(out[~touched], before[~touched])          # bit for bit
    r64, _ = ref(q.double(), _d(ks), _d(vs), q_index=qi, out=before.double())
    rlo, _ = ref(q, ks, vs, q_index=qi, out=before)
    assert_matches_reference(out, r64, rlo)


def test_empty_and_full_index():
    q = bshd(2, 12, 2, 8, torch.float32)
    ks, vs = segments(2, [5, 7], 2, 8, torch.float32)
    empty = torch.zeros(2, 0, dtype=torch.int64)
    o, l = dtk.multi_kv_attention(q, ks, vs, q_index=empty, return_lse=True)
    assert o.shape == (2, 0, 2, 8) and l.shape == (2, 2, 0)
    out = torch.randn(2, 12, 2, 8)
    before = out.clone()
    dtk.multi_kv_attention(q, ks, vs, q_index=empty, out=out)
    assert torch.equal(out, before)
    full = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(dtk.multi_kv_attention(q, ks, vs, q_index=full), dtk.multi_kv_attention(q, ks, vs))


def test_padding_and_duplicates_defined():
    q = bshd(1, 10, 2, 8, torch.float64)
    ks, vs = segments(1, [6], 2, 8, torch.float64)
    qi = torch.tensor([[3, 3, -1, 7]])
    o, l = dtk.multi_kv_attention(q, ks, vs, q_index=qi, return_lse=True)
    dense = dtk.multi_kv_attention(q, ks, vs)
    torch.testing.assert_close(o[0, 0], dense[0, 3])
    torch.testing.assert_close(o[0, 1], dense[0, 3])
    assert torch.equal(o[0, 2], torch.zeros_like(o[0, 2])) and torch.isneginf(l[0, :, 2]).all()
    out = torch.zeros(1, 10, 2, 8, dtype=torch.float64)
    dtk.multi_kv_attention(q, ks, vs, q_index=qi, out=out)
    torch.testing.assert_close(out[0, 3], dense[0, 3])


def test_all_keys_masked_gives_zero_and_neg_inf():
    q = bshd(1, 4, 2, 8, torch.float32)
    ks, vs = segments(1, [0, 5], 2, 8, torch.float32)
    o, l = dtk.multi_kv_attention(q, ks, vs, kv_index=[None, torch.tensor([-1, -1])], return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all()


def _bad_cases():
    q = bshd(1, 8, 2, 8, torch.float32)
    ks, vs = segments(1, [4, 5], 2, 8, torch.float32)
    qi = torch.tensor([[0, 1]])
    return [
        ("q_index", dict(q_index=torch.tensor([[0, 8]]))),
        ("q_index", dict(q_index=torch.tensor([[0, -2]]))),
        ("q_index", dict(q_index=torch.tensor([[0.0, 1.0]]))),
        ("q_index", dict(q_index=torch.tensor([0, 1]))),
        ("kv_index", dict(kv_index=[torch.tensor([4]), None])),
        ("kv_index", dict(kv_index=[torch.tensor([1.0]), None])),
        ("kv_index", dict(kv_index=[None])),
        ("out", dict(out=torch.zeros(1, 8, 2, 8))),
        ("out", dict(q_index=qi, out=torch.zeros(1, 9, 2, 8))),
        ("out", dict(q_index=qi, out=torch.zeros(1, 8, 2, 8, dtype=torch.float64))),
        ("scale", dict(scale=-1.0)),
        ("scale", dict(scale="x")),
        ("q_index", dict(q_index=[[0, 1]])),
        ("kv_index\\[0\\]", dict(kv_index=[[0, 1], None])),
    ], q, ks, vs


def test_bad_input_names_the_argument():
    cases, q, ks, vs = _bad_cases()
    for name, kw in cases:
        with pytest.raises((ValueError, TypeError, IndexError, RuntimeError), match=f"(?i){name}"):
            dtk.multi_kv_attention(q, ks, vs, **kw)
    bad = [
        ("vs", (q, ks, vs[:1])),
        ("mismatched segments", (q, ks, [vs[0], vs[0]])),
        ("ks\\[1\\]", (q, [ks[0], torch.randn(1, 5, 2, 4)], vs)),
        ("ks\\[0\\]", (q, [ks[0].double(), ks[1]], vs)),
        ("heads", (bshd(1, 8, 3, 8, torch.float32), ks, vs)),
        ("ks", (q, [], [])),
        ("ks\\[0\\].*head", (q, [k[:, :, :0] for k in ks], [v[:, :, :0] for v in vs])),
    ]
    for name, args in bad:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=f"(?i){name}"):
            dtk.multi_kv_attention(*args)


def test_cpp_kernel_checks_without_wrapper():
    """The C++ kernel's errors have the Python checks' types (IndexError for index values)."""
    cases, q, ks, vs = _bad_cases()
    with pytest.raises(IndexError, match="q_index out of range"):
        torch.ops.dtk.multi_kv_attention(q, ks, vs, [None, None], torch.tensor([[0, 8]]), None)
    with pytest.raises(ValueError, match="mismatched segments"):
        torch.ops.dtk.multi_kv_attention(q, ks, [vs[0], vs[0]], [None, None], None, None)
    with pytest.raises(IndexError, match="kv_index\\[1\\] out of range"):
        torch.ops.dtk.multi_kv_attention(q, ks, vs, [None, torch.tensor([5])], None, None)


def test_meta_shapes():
    q = torch.empty(2, 8, 4, 16, device="meta")
    ks = [torch.empty(2, 5, 2, 16, device="meta"), torch.empty(2, 0, 2, 16, device="meta")]
    o, l = dtk.multi_kv_attention(q, ks, ks, q_index=torch.empty(2, 3, dtype=torch.int32, device="meta"),
                                  return_lse=True)
    assert o.shape == (2, 3, 4, 16) and l.shape == (2, 4, 3) and l.dtype == torch.float32


def test_opcheck():
    q = bshd(2, 10, 4, 8, torch.float32, transposed=True)
    ks, vs = segments(2, [6, 3], 2, 8, torch.float32)
    kvi = [None, torch.tensor([0, 2, -1])]
    qi = torch.tensor([[1, 5, -1], [0, 9, 3]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dtk.multi_kv_attention.default, (q, ks, vs, kvi, qi, None))
    torch.library.opcheck(torch.ops.dtk.multi_kv_attention.default, (q, ks, vs, [None, None], None, 0.5))
    out = torch.randn(2, 10, 4, 8)
    torch.library.opcheck(torch.ops.dtk.multi_kv_attention_out.default, (q, ks, vs, kvi, qi, None, out))


def test_torch_compile():
    q = bshd(1, 10, 2, 8, torch.float32)
    ks, vs = segments(1, [6, 3], 2, 8, torch.float32)
    qi = torch.tensor([[1, 5, 7]])

    def f(q, k0, k1, v0, v1, qi, out):
        return dtk.multi_kv_attention(q, [k0, k1], [v0, v1], q_index=qi, out=out)
    out1, out2 = torch.zeros(1, 10, 2, 8), torch.zeros(1, 10, 2, 8)
    torch.compile(f, fullgraph=True, backend="aot_eager")(q, ks[0], ks[1], vs[0], vs[1], qi, out1)
    f(q, ks[0], ks[1], vs[0], vs[1], qi, out2)
    torch.testing.assert_close(out1, out2)
