"""The C++ CPU kernels of dtk::multi_kv_attention_backward and dtk::segment_attention_backward
against float64 autograd through the dense references (random sweeps, keys over several chunks and
queries over several blocks, unreached rows, low precision), strided inputs, thread-count
independence, argument validation and opcheck (schema)."""
import random

import pytest
import torch

import dtk  # noqa: F401
from dtk.ops.sparse.reference import multi_kv_attention_reference, segment_attention_reference
from ...helpers import assert_matches_reference, bshd
from .cases import segments

MKV, MKV_BWD = torch.ops.dtk.multi_kv_attention, torch.ops.dtk.multi_kv_attention_backward
SEG, SEG_BWD = torch.ops.dtk.segment_attention, torch.ops.dtk.segment_attention_backward


def _grads(fn, inputs, g, gl, dtype):
    """Gradients of (out * g).sum() + (lse * gl).sum() by autograd through fn(*inputs in dtype);
    zeros for inputs the reference does not use (empty segments)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = fn(*ins)
    loss = (out * g.to(dtype)).sum()
    if gl is not None:
        loss = loss + (lse * gl).sum()  # lse is float32, its gradient gl exactly
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for d, t in zip(grads, ins)]


def _random_grads(out, lse, with_grad_lse):
    g = torch.randn_like(out)
    gl = None
    if with_grad_lse:
        gl = torch.randn_like(lse)
        gl[torch.isinf(lse)] = 0  # (the reference's gradient there is NaN * 0)
    return g, gl


def _compare(names, got, refs, lowp, like, dtype):
    for i, (name, x, ref, t) in enumerate(zip(names, got, refs, like)):
        assert x.shape == t.shape and x.dtype == dtype and x.is_contiguous(), name
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        if lowp is None:
            torch.testing.assert_close(x, ref, atol=1e-10 * scale, rtol=0, msg=name)
        else:
            atol = (1e-5 if dtype == torch.float32 else 5e-3) * scale
            assert_matches_reference(x, ref, lowp[i], atol=atol, name=name)


def check_mkv(q, ks, vs, kv_index=None, q_index=None, scale=None, *, with_grad_lse=True):
    """Forward then backward of the C++ kernels; gradients against float64 autograd (float64: to
    1e-10 relative; else the rule of tests/helpers.py against autograd in the kernel's dtype)."""
    nseg = len(ks)
    kv_index = [None] * nseg if kv_index is None else kv_index
    out, lse = MKV(q, ks, vs, kv_index, q_index, scale)
    g, gl = _random_grads(out, lse, with_grad_lse)
    dq, dks, dvs = MKV_BWD(g, gl, q, ks, vs, kv_index, q_index, scale, out, lse)

    def ref(dtype):
        fn = lambda q_, *kv: multi_kv_attention_reference(q_, kv[:nseg], kv[nseg:], kv_index, q_index, scale)  # noqa
        return _grads(fn, [q, *ks, *vs], g, gl, dtype)

    lowp = None if q.dtype == torch.float64 else ref(q.dtype)
    names = ["dq"] + [f"dks[{i}]" for i in range(nseg)] + [f"dvs[{i}]" for i in range(nseg)]
    _compare(names, [dq, *dks, *dvs], ref(torch.float64), lowp, [q, *ks, *vs], q.dtype)
    return out, lse, (dq, dks, dvs)


def check_seg(q, k, v, cu, gm, gb=None, scale=None, *, with_grad_lse=True):
    out, lse = SEG(q, k, v, cu, gm, gb, scale)
    g, gl = _random_grads(out, lse, with_grad_lse)
    grads = SEG_BWD(g, gl, q, k, v, cu, gm, gb, scale, out, lse)

    def ref(dtype):
        bias = None if gb is None else gb.to(dtype)
        fn = lambda *qkv: segment_attention_reference(*qkv, cu, gm, bias, scale)  # noqa: E731
        return _grads(fn, [q, k, v], g, gl, dtype)

    lowp = None if q.dtype == torch.float64 else ref(q.dtype)
    _compare(["dq", "dk", "dv"], grads, ref(torch.float64), lowp, [q, k, v], q.dtype)
    return out, lse, grads


def _kv_index(rng, B, L):
    """None, (m,) int64 or (B, m) int32 key positions of a segment of length L, with repeated
    entries and -1 padding (only padding for an empty segment)."""
    kind = rng.choice(["none", "shared", "per_batch"])
    if kind == "none":
        return None
    m = rng.randint(1, 9)
    shape = (m,) if kind == "shared" else (B, m)
    idx = torch.randint(0, L, shape) if L else torch.full(shape, -1)
    if m > 1:
        idx[..., 1] = idx[..., 0]  # a repeated key
    if m > 2:
        idx[..., -1] = -1  # padding
    return idx if kind == "shared" else idx.int()


def _q_index(rng, B, S):
    """None, or (B, n) rows with -1 padding and duplicates; n may be 0."""
    if rng.random() < 0.3:
        return None
    n = rng.choice([0, 1, 5, S + 3])
    return torch.randint(-1, S, (B, n))


def _layout(rng, G, max_len):
    lens = [rng.choice([0, rng.randint(1, max_len)]) for _ in range(G)]
    cu = torch.zeros(G + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu


# ---------------------------------------------------------------------------------------------
# Against float64 autograd.

@pytest.mark.parametrize("i", range(16))
def test_mkv_random_sweep(i):
    # 1-4 segments (0-length ones included), kv_index None / (m,) / (B, m) with padding and repeats,
    # q_index with padding, duplicates, n = 0, GQA, SDPA-layout (transposed) inputs, scale;
    # float64 and float32, with and without grad_lse.
    rng = random.Random(torch.initial_seed() + i)
    dtype = (torch.float64, torch.float32)[i % 2]
    B, Hkv, D = rng.randint(1, 2), rng.choice([1, 2]), rng.choice([8, 16, 40])
    H = Hkv * rng.choice([1, 2, 3])
    lens = [rng.choice([0, rng.randint(1, 30)]) for _ in range(rng.randint(1, 4))]
    S = rng.randint(1, 30)
    tr = rng.random() < 0.5
    q = bshd(B, S, H, D, dtype, transposed=tr)
    ks, vs = segments(B, lens, Hkv, D, dtype, transposed=tr)
    kv_index = [_kv_index(rng, B, L) for L in lens]
    check_mkv(q, ks, vs, kv_index, _q_index(rng, B, S), rng.choice([None, 0.3]), with_grad_lse=rng.random() < 0.6)


@pytest.mark.parametrize("i", range(12))
def test_segment_random_sweep(i):
    # G = 1..5 branches (empty ones included), random masks with rows that see nothing, with and
    # without group_bias, GQA, transposed inputs, scale; float64 and float32, with and without grad_lse.
    rng = random.Random(torch.initial_seed() + 1000 + i)
    dtype = (torch.float64, torch.float32)[i % 2]
    G = 1 + i % 5
    cu = _layout(rng, G, 20)
    S = int(cu[-1])
    Hkv, D = rng.choice([1, 2]), rng.choice([8, 16, 32])
    H = Hkv * rng.choice([1, 3])
    tr = rng.random() < 0.5
    q, k, v = (bshd(2, S, h, D, dtype, transposed=tr) for h in (H, Hkv, Hkv))
    gm = torch.rand(G, G) > 0.4
    gm[rng.randrange(G)] = False  # a branch that sees nothing
    gb = torch.randn(G, G, dtype=dtype) if rng.random() < 0.5 else None
    check_seg(q, k, v, cu, gm, gb, rng.choice([None, 0.25]), with_grad_lse=rng.random() < 0.6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_chunk_and_block(dtype):
    # More keys than one chunk (1024) and more query rows than one backward block (128).
    q = bshd(1, 300, 2, 8, dtype, transposed=True)
    ks, vs = segments(1, [1100, 40], 1, 8, dtype)
    check_mkv(q, ks, vs, [None, torch.tensor([3, 3, -1, 39])], torch.randint(-1, 300, (1, 260)))
    cu = torch.tensor([0, 200, 1130, 1300], dtype=torch.int32)
    q, k, v = (bshd(1, 1300, h, 8, dtype) for h in (2, 1, 1))
    gm = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    check_seg(q, k, v, cu, gm, torch.tensor([[0.0, 0.0, -0.5], [0, 0, 0], [1.0, 0, 0]], dtype=dtype))


def test_unreached_rows_are_zero_and_duplicates_add():
    B, S, H, D = 1, 10, 2, 8
    q = bshd(B, S, H, D, torch.float64)
    ks, vs = segments(B, [6, 5], 1, D, torch.float64)
    qi = torch.tensor([[3, 3, -1, 7]])
    kvi = [torch.tensor([1, 1, -1]), None]
    out, lse, (dq, dks, dvs) = check_mkv(q, ks, vs, kvi, qi)
    rest = [r for r in range(S) if r not in (3, 7)]
    assert (dq[0, rest] == 0).all()
    assert (dks[0][0, [0, 2, 3, 4, 5]] == 0).all() and (dvs[0][0, [0, 2, 3, 4, 5]] == 0).all()
    # Row 3 listed twice: the sum of the contributions of both listings.
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    twice = MKV_BWD(g, gl, q, ks, vs, kvi, qi, None, out, lse)[0]
    first = MKV_BWD(g[:, :1], gl[..., :1], q, ks, vs, kvi, qi[:, :1], None, out[:, :1], lse[..., :1])[0]
    second = MKV_BWD(g[:, 1:2], gl[..., 1:2], q, ks, vs, kvi, qi[:, 1:2], None, out[:, 1:2], lse[..., 1:2])[0]
    torch.testing.assert_close(twice[0, 3], first[0, 3] + second[0, 3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_grad_lse", [True, False])
def test_rows_without_keys(with_grad_lse):
    q = bshd(2, 5, 2, 8, torch.float64)
    ks, vs = segments(2, [0, 4], 2, 8, torch.float64)
    out, lse, (dq, dks, dvs) = check_mkv(q, ks, vs, [None, torch.tensor([-1, -1])], with_grad_lse=with_grad_lse)
    assert torch.isinf(lse).all() and (out == 0).all()
    assert (dq == 0).all() and all((d == 0).all() for d in dks + dvs)
    k, v = bshd(2, 5, 2, 8, torch.float64), bshd(2, 5, 2, 8, torch.float64)
    out, lse, (dq, dk, dv) = check_seg(q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32),
                                       torch.tensor([[0, 0], [0, 0]], dtype=torch.bool), with_grad_lse=with_grad_lse)
    assert torch.isinf(lse).all() and (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q = bshd(1, 20, 4, 16, dtype)
    ks, vs = segments(1, [9, 14], 2, 16, dtype)
    check_mkv(q, ks, vs, [torch.tensor([0, 4, 4, -1]), None], torch.tensor([[2, 2, -1, 19, 0]]))
    k, v = bshd(1, 20, 2, 16, dtype), bshd(1, 20, 2, 16, dtype)
    gm = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)
    check_seg(q, k, v, torch.tensor([0, 8, 20], dtype=torch.int32), gm, torch.randn(2, 2), with_grad_lse=False)


# ---------------------------------------------------------------------------------------------
# Layouts and threads.

def _strided(t):
    """A copy of t as a non-contiguous view along its leading dims (last dim contiguous)."""
    big = torch.empty(t.shape[0], 2 * t.shape[1], t.shape[2] + 1, *t.shape[3:], dtype=t.dtype)
    view = big[:, ::2, 1:]
    view.copy_(t)
    return view


def _lse_strided(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _mkv_case(dtype=torch.float64):
    q = bshd(2, 16, 4, 8, dtype)
    ks, vs = segments(2, [7, 0, 12], 2, 8, dtype)
    kvi = [torch.tensor([0, 6, 6, -1]), None, torch.randint(-1, 12, (2, 5), dtype=torch.int32)]
    qi = torch.randint(-1, 16, (2, 11))
    out, lse = MKV(q, ks, vs, kvi, qi, None)
    return q, ks, vs, kvi, qi, out, lse


def _seg_case(dtype=torch.float64):
    q, k, v = (bshd(2, 18, h, 8, dtype) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 4, 18], dtype=torch.int32)
    gm = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    gb = torch.randn(3, 3)
    out, lse = SEG(q, k, v, cu, gm, gb, None)
    return q, k, v, cu, gm, gb, out, lse


def test_strided_inputs():
    q, ks, vs, kvi, qi, out, lse = _mkv_case()
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    want = MKV_BWD(g, gl, q, ks, vs, kvi, qi, None, out, lse)
    got = MKV_BWD(_strided(g), _lse_strided(gl), _strided(q), [_strided(k) for k in ks], [_strided(v) for v in vs],
                  kvi, qi, None, _strided(out), _lse_strided(lse))
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        assert a.is_contiguous() and torch.equal(a, b)
    q, k, v, cu, gm, gb, out, lse = _seg_case()
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    want = SEG_BWD(g, gl, q, k, v, cu, gm, gb, None, out, lse)
    got = SEG_BWD(_strided(g), _lse_strided(gl), _strided(q), _strided(k), _strided(v), cu, gm, gb, None,
                  _strided(out), _lse_strided(lse))
    for a, b in zip(got, want):
        assert a.is_contiguous() and torch.equal(a, b)


def test_thread_count_independent():
    # Work items are (batch, kv head) pairs (4 here, at least the thread count): no races, and each
    # item's sums run in the same order whatever the thread count.
    mq, mks, mvs, kvi, qi, mout, mlse = _mkv_case(torch.float32)
    sq, sk, sv, cu, gm, gb, sout, slse = _seg_case(torch.float32)
    mg, sg = torch.randn_like(mout), torch.randn_like(sout)

    def run():
        dq, dks, dvs = MKV_BWD(mg, None, mq, mks, mvs, kvi, qi, None, mout, mlse)
        return [dq, *dks, *dvs, *SEG_BWD(sg, None, sq, sk, sv, cu, gm, gb, None, sout, slse)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Validation: every bad argument raises with its name in the message.

def _mkv_base():
    q = bshd(1, 8, 4, 8, torch.float32)
    ks, vs = segments(1, [4, 5], 2, 8, torch.float32)
    qi = torch.tensor([[0, 3, -1]])
    out, lse = MKV(q, ks, vs, [None, None], qi, None)
    return dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse), q=q, ks=ks, vs=vs,
                kv_index=[None, None], q_index=qi, scale=None, out=out, lse=lse)


def _seg_base():
    q, k, v = (bshd(1, 10, h, 8, torch.float32) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    gm = torch.ones(2, 2, dtype=torch.bool)
    out, lse = SEG(q, k, v, cu, gm, None, None)
    return dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse), q=q, k=k, v=v, cu_seqlens=cu,
                group_mask=gm, group_bias=None, scale=None, out=out, lse=lse)


def _run(op, base, **changes):
    a = base()
    a.update(changes)
    return op(*a.values())


_OUT_LIKE = [  # bad grad_out / out for a (1, 3, 4, 8) forward output (mkv) or (1, 10, 4, 8) (segment)
    lambda n: torch.randn(1, n, 4, 4),
    lambda n: torch.randn(1, n + 1, 4, 8),
    lambda n: torch.randn(1, n, 2, 8),
    lambda n: torch.randn(n, 4, 8),
    lambda n: torch.randn(1, n, 4, 8, dtype=torch.float64),
    lambda n: torch.randn(1, n, 4, 16)[..., ::2],
]
_LSE_LIKE = [
    lambda n: torch.randn(1, 4, n, dtype=torch.float64),
    lambda n: torch.randn(1, 4, n).half(),
    lambda n: torch.randn(1, n, 4),
    lambda n: torch.randn(1, 4, n + 1),
    lambda n: torch.randn(1, 4, n, 1),
]
BAD = (
    [(MKV_BWD, _mkv_base, 3, {arg: f}, arg) for arg in ("grad_out", "out") for f in _OUT_LIKE]
    + [(MKV_BWD, _mkv_base, 3, {arg: f}, arg) for arg in ("lse", "grad_lse") for f in _LSE_LIKE]
    + [(SEG_BWD, _seg_base, 10, {arg: f}, arg) for arg in ("grad_out", "out") for f in _OUT_LIKE]
    + [(SEG_BWD, _seg_base, 10, {arg: f}, arg) for arg in ("lse", "grad_lse") for f in _LSE_LIKE]
    + [
        (MKV_BWD, _mkv_base, 3, dict(q_index=lambda n: torch.tensor([[0, 8, 1]])), "q_index"),
        (MKV_BWD, _mkv_base, 3, dict(q_index=lambda n: torch.tensor([[0.0, 1.0, 2.0]])), "q_index"),
        (MKV_BWD, _mkv_base, 3, dict(kv_index=lambda n: [torch.tensor([4]), None]), "kv_index\\[0\\]"),
        (MKV_BWD, _mkv_base, 3, dict(kv_index=lambda n: [None]), "kv_index"),
        (MKV_BWD, _mkv_base, 3, dict(vs=lambda n: [torch.randn(1, 4, 2, 8)] * 2), "mismatched segments"),
        (MKV_BWD, _mkv_base, 3, dict(ks=lambda n: [torch.randn(1, 4, 3, 8), torch.randn(1, 5, 3, 8)],
                                     vs=lambda n: [torch.randn(1, 4, 3, 8), torch.randn(1, 5, 3, 8)]), "heads"),
        (MKV_BWD, _mkv_base, 3, dict(scale=lambda n: -1.0), "scale"),
        (SEG_BWD, _seg_base, 10, dict(group_mask=lambda n: torch.ones(3, 3, dtype=torch.bool)), "group_mask"),
        (SEG_BWD, _seg_base, 10, dict(group_bias=lambda n: torch.zeros(3, 2)), "group_bias"),
        (SEG_BWD, _seg_base, 10, dict(cu_seqlens=lambda n: torch.tensor([0, 4, 9], dtype=torch.int32)),
         "cu_seqlens"),
        (SEG_BWD, _seg_base, 10, dict(k=lambda n: torch.randn(1, 9, 2, 8)), "k"),
    ]
)


@pytest.mark.parametrize("op,base,n,changes,name", BAD, ids=[f"{i}-{b[-1]}" for i, b in enumerate(BAD)])
def test_bad_inputs(op, base, n, changes, name):
    with pytest.raises((ValueError, TypeError, IndexError), match=name) as e:
        _run(op, base, **{k: f(n) for k, f in changes.items()})
    assert "_backward" in str(e.value)  # the message names the op


def test_valid_bases_run():
    dq, dks, dvs = _run(MKV_BWD, _mkv_base)
    assert dq.shape == (1, 8, 4, 8) and [d.shape for d in dks + dvs] == [(1, 4, 2, 8), (1, 5, 2, 8)] * 2
    assert not any(x.isnan().any() for x in [dq, *dks, *dvs])
    assert _run(MKV_BWD, _mkv_base, grad_lse=None)[0].shape == (1, 8, 4, 8)
    grads = _run(SEG_BWD, _seg_base)
    assert [g.shape for g in grads] == [(1, 10, 4, 8), (1, 10, 2, 8), (1, 10, 2, 8)]
    assert _run(SEG_BWD, _seg_base, grad_lse=None)[0].shape == (1, 10, 4, 8)


def test_opcheck():
    q, ks, vs, kvi, qi, out, lse = _mkv_case(torch.float32)
    args = (torch.randn_like(out), torch.randn_like(lse), q, ks, vs, kvi, qi, None, out, lse)
    torch.library.opcheck(MKV_BWD, args)
    out, lse = MKV(q, ks, vs, [None] * 3, None, 0.5)
    args = (torch.randn_like(out), None, q, ks, vs, [None] * 3, None, 0.5, out, lse)
    torch.library.opcheck(MKV_BWD, args)
    q, k, v, cu, gm, gb, out, lse = _seg_case(torch.float32)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, cu, gm, gb, None, out, lse)
    torch.library.opcheck(SEG_BWD, args)
