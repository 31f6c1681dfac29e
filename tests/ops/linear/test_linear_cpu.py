"""Linear-attention ops on the CPU (C++ kernels) against the float64 reference."""
import random

import pytest
import torch

import dtk
from dtk.ops.linear.reference import (linear_attention_quadratic_reference, linear_attention_reference,
                                      linear_attention_state_reference, split_bounds)
from ...helpers import assert_matches_reference, bshd, cu_seqlens, max_err, qk_lengths

FMS = ("elu1", "relu", "identity")


def _inputs(B, Sq, Sk, H, Hkv, D, Dv, dtype, strided=False):
    q = bshd(B, Sq, H, D, dtype, transposed=strided)
    k = bshd(B, Sk, Hkv, D, dtype, transposed=strided)
    v = bshd(B, Sk, Hkv, Dv, dtype, transposed=strided)
    return q, k, v


def _check(out, q, k, v, atol=1e-5, **kw):
    ref64 = linear_attention_reference(q.double(), k.double(), v.double(), **kw)
    ref = linear_attention_reference(q, k, v, **kw)
    assert_matches_reference(out, ref64, ref, atol=atol)


def test_reference_matches_quadratic_form():
    q, k, v = _inputs(2, 9, 13, 4, 2, 16, 8, torch.float64)
    for fm in FMS:
        for norm in (True, False):
            a = linear_attention_reference(q, k, v, fm, norm, 1e-4, 0.3)
            b = linear_attention_quadratic_reference(q, k, v, fm, norm, 1e-4, 0.3)
            # relative to the output's size: identity + normalize can divide by a near-zero sum,
            # which makes outputs (and their rounding) large
            assert max_err(a, b) < 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("D", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(D, dtype):
    H, Hkv = random.choice([(2, 2), (4, 2), (4, 1)])
    Dv = random.choice([D, 32])
    Sq, Sk = random.randint(1, 300), random.randint(1, 300)
    q, k, v = _inputs(2, Sq, Sk, H, Hkv, D, Dv, dtype, strided=random.random() < 0.5)
    fm = random.choice(FMS)
    norm = fm != "identity" or random.random() < 0.5  # identity + normalize may have a ~0 denominator
    out = dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm)
    _check(out, q, k, v, feature_map=fm, normalize=norm, atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("S", [1, 2, 17, 1000, 4097, 10000])
def test_sequence_lengths(S):
    q, k, v = _inputs(1, S, S, 2, 2, 64, 64, torch.float32)
    scale = random.choice([None, 0.125])
    out = dtk.linear_attention(q, k, v, scale=scale)
    _check(out, q, k, v, scale=scale, atol=1e-4)


def test_sq_differs_from_sk_and_gqa_strided():
    q, k, v = _inputs(3, 50, 333, 6, 2, 80, 80, torch.float32, strided=True)
    for norm in (True, False):
        out = dtk.linear_attention(q, k, v, normalize=norm, feature_map="relu")
        _check(out, q, k, v, normalize=norm, feature_map="relu", atol=1e-3)


def test_fp64_exact():
    q, k, v = _inputs(2, 30, 40, 4, 2, 40, 40, torch.float64)
    out = dtk.linear_attention(q, k, v)
    assert max_err(out, linear_attention_quadratic_reference(q, k, v)) < 1e-12


def test_cu_seqlens():
    lens = [random.randint(0, 400) for _ in range(4)] + [1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = _inputs(1, T, T, 4, 2, 64, 48, torch.float32)
    out = dtk.linear_attention(q, k, v, cu_seqlens=cu)
    _check(out, q, k, v, cu_seqlens=cu, atol=1e-4)
    # each sequence alone gives the same rows
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            alone = dtk.linear_attention(q[:, s:e], k[:, s:e], v[:, s:e])
            assert max_err(out[:, s:e], alone) < 1e-5


def _packed_qk(lq, lk, H, Hkv, D, Dv, dtype, fm, norm):
    """Packed q (1, sum lq, H, D), k and v (1, sum lk, Hkv, .); identity + normalize gets positive
    q and k (a denominator near 0 would make the output ill-conditioned)."""
    q, k, v = _inputs(1, sum(lq), sum(lk), H, Hkv, D, Dv, dtype)
    if fm == "identity" and norm:
        q, k = q.abs(), k.abs()
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fm", FMS)
@pytest.mark.parametrize("norm", [True, False])
def test_cu_seqlens_k(dtype, fm, norm):
    """cu_seqlens packs q, cu_seqlens_k packs k and v (different totals, zero-length sequences on
    either side): each sequence equals its own unpacked call, and queries without keys get 0."""
    lq, lk = qk_lengths(6, 150)
    cu, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    H, Hkv = random.choice([(4, 2), (4, 1), (2, 2)])
    q, k, v = _packed_qk(lq, lk, H, Hkv, 32, 24, dtype, fm, norm)
    kw = dict(feature_map=fm, normalize=norm, scale=random.choice([None, 0.3]))
    out = dtk.linear_attention(q, k, v, cu_seqlens=cu, cu_seqlens_k=cu_k, **kw)
    ref64 = linear_attention_reference(q.double(), k.double(), v.double(), cu_seqlens=cu, cu_seqlens_k=cu_k, **kw)
    ref = linear_attention_reference(q, k, v, cu_seqlens=cu, cu_seqlens_k=cu_k, **kw)
    assert_matches_reference(out, ref64, ref, atol=1e-5 * (1 if norm else max(1.0, ref64.abs().max().item())))
    bq, bk = cu.tolist(), cu_k.tolist()
    for i in range(len(lq)):
        if lq[i] == 0:
            continue
        rows = out[:, bq[i]:bq[i + 1]]
        alone = dtk.linear_attention(q[:, bq[i]:bq[i + 1]], k[:, bk[i]:bk[i + 1]], v[:, bk[i]:bk[i + 1]], **kw)
        assert max_err(rows, alone) <= 1e-6 * (1 + alone.abs().max().item()), i
        if lk[i] == 0:
            assert not rows.any(), i


def test_cu_seqlens_k_equal_to_cu_seqlens_is_the_shared_packing():
    cu = cu_seqlens([5, 0, 17, 2])
    q, k, v = _inputs(1, 24, 24, 4, 2, 16, 16, torch.float64)
    assert max_err(dtk.linear_attention(q, k, v, cu_seqlens=cu, cu_seqlens_k=cu),
                   dtk.linear_attention(q, k, v, cu_seqlens=cu)) == 0


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_state_split_merge(parts):
    S = random.randint(parts, 3000)
    q, k, v = _inputs(2, 77, S, 4, 2, 64, 64, torch.float32)
    fm = random.choice(["elu1", "relu"])
    states = [dtk.linear_attention_state(k[:, s:e], v[:, s:e], feature_map=fm) for s, e in split_bounds(S, parts)]
    kv = sum(st[0] for st in states)
    ks = sum(st[1] for st in states)
    cnt = sum(st[2] for st in states)
    assert cnt.dtype == torch.int64 and cnt.tolist() == [S, S]
    for norm in (True, False):
        merged = dtk.linear_attention_apply(q, kv, ks, cnt, feature_map=fm, normalize=norm)
        whole = dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm)
        assert max_err(merged, whole) <= 1e-5 * (1 + whole.abs().max().item())
        _check(merged, q, k, v, feature_map=fm, normalize=norm, atol=1e-3)


def test_state_matches_reference_and_varlen():
    cu = torch.tensor([0, 5, 5, 60], dtype=torch.int32)
    k = torch.randn(1, 60, 2, 40, dtype=torch.float64)
    v = torch.randn(1, 60, 2, 24, dtype=torch.float64)
    got = dtk.linear_attention_state(k, v, cu_seqlens=cu)
    ref = linear_attention_state_reference(k, v, "elu1", cu)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and max_err(a, b) < 1e-10
    assert got[2].tolist() == [5, 0, 55]
    q = torch.randn(1, 60, 4, 40, dtype=torch.float64)
    out = dtk.linear_attention_apply(q, *got, cu_seqlens=cu)
    assert max_err(out, dtk.linear_attention(q, k, v, cu_seqlens=cu)) < 1e-12


def test_duplicated_tokens_leave_normalised_output_unchanged():
    q, k, v = _inputs(2, 64, 200, 4, 4, 64, 64, torch.float64)
    a = dtk.linear_attention(q, k, v)
    b = dtk.linear_attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1))
    c = dtk.linear_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert max_err(a, b) < 1e-12 and max_err(a, c) < 1e-12


@pytest.mark.parametrize("fm", FMS)
@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck(fm, norm):
    q, k, v = _inputs(2, 5, 7, 4, 2, 8, 6, torch.float64)
    if fm == "identity" and norm:
        k = k.abs()  # keep the denominator away from 0
        q = q.abs()
    for t in (q, k, v):
        t.requires_grad_()
    torch.autograd.gradcheck(lambda q, k, v: dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm, scale=0.7),
                             (q, k, v))


def test_gradcheck_varlen_and_fp32_grad():
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    q, k, v = (torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda q, k, v: dtk.linear_attention(q, k, v, cu_seqlens=cu), (q, k, v))
    # float32 gradients against float64 autograd of the reference
    q, k, v = _inputs(2, 100, 120, 4, 2, 40, 40, torch.float32)
    g = torch.randn(2, 100, 4, 40)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    dtk.linear_attention(*qs).backward(g)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs).backward(g.double())
    for a, b in zip(qs, rs):
        assert max_err(a.grad, b.grad) < 1e-4 * (1 + b.grad.abs().max().item())


@pytest.mark.parametrize("fm", FMS)
@pytest.mark.parametrize("norm", [True, False])
def test_gradcheck_cu_seqlens_k(fm, norm):
    cu = torch.tensor([0, 3, 3, 5, 9], dtype=torch.int32)     # queries: 3, 0, 2, 4
    cu_k = torch.tensor([0, 4, 6, 6, 7], dtype=torch.int32)   # keys:    4, 2, 0, 1
    q, k, v = _packed_qk([9], [7], 4, 2, 8, 6, torch.float64, fm, norm)
    for t in (q, k, v):
        t.requires_grad_()
    torch.autograd.gradcheck(lambda q, k, v: dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm, scale=0.7,
                                                                  cu_seqlens=cu, cu_seqlens_k=cu_k), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [True, False])
def test_cu_seqlens_k_grads(dtype, norm):
    """Gradients with separate packings against float64 autograd through the reference."""
    lq, lk = qk_lengths(5, 120)
    cu, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    q, k, v = _packed_qk(lq, lk, 4, 2, 40, 24, dtype, "elu1", norm)
    g = torch.randn(1, sum(lq), 4, 24, dtype=dtype)
    kw = dict(normalize=norm, scale=0.5, cu_seqlens=cu, cu_seqlens_k=cu_k)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    dtk.linear_attention(*ts, **kw).backward(g)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, **kw).backward(g.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    for name, a, b in zip("qkv", ts, rs):
        assert max_err(a.grad, b.grad) < tol * (1 + b.grad.abs().max().item()), name


def test_opcheck():
    q, k, v = _inputs(2, 6, 9, 4, 2, 16, 8, torch.float32)
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dtk.linear_attention.default, (q, k, v, "elu1", True, 1e-4, None, None))
    torch.library.opcheck(torch.ops.dtk.linear_attention.default, (q[:1], k[:1, :6], v[:1, :6], "relu", False, 1e-4,
                                                                   0.5, cu))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    g = torch.randn(2, 6, 4, 8)
    torch.library.opcheck(torch.ops.dtk.linear_attention_backward.default,
                          (g, qd, kd, vd, "elu1", True, 1e-4, None, None))
    st = torch.ops.dtk.linear_attention_state(kd, vd, "elu1", None)
    torch.library.opcheck(torch.ops.dtk.linear_attention_state.default, (kd, vd, "elu1", None))
    torch.library.opcheck(torch.ops.dtk.linear_attention_apply.default, (qd, *st, "elu1", True, 1e-4, None, None))


def test_opcheck_cu_seqlens_k():
    cu = torch.tensor([0, 4, 4, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 5, 9], dtype=torch.int32)
    q, k, v = _inputs(1, 6, 9, 4, 2, 16, 8, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.dtk.linear_attention.default, (q, k, v, "elu1", True, 1e-4, None, cu, cu_k))
    torch.library.opcheck(torch.ops.dtk.linear_attention.default, (q, k, v, "relu", False, 1e-4, 0.5, cu, cu_k))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    g = torch.randn(1, 6, 4, 8)
    torch.library.opcheck(torch.ops.dtk.linear_attention_backward.default,
                          (g, qd, kd, vd, "elu1", True, 1e-4, None, cu, cu_k))


# ---------------------------------------------------------------------------------------- bad input

def _raises(match, fn):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fn()


def test_bad_inputs_name_the_argument():
    q, k, v = _inputs(1, 10, 10, 4, 2, 16, 16, torch.float32)
    la = dtk.linear_attention
    _raises("feature_map", lambda: la(q, k, v, feature_map="softmax"))
    _raises("eps", lambda: la(q, k, v, eps=0.0))
    _raises("eps", lambda: la(q, k, v, eps=-1.0))
    _raises("eps", lambda: la(q, k, v, eps=True))
    _raises("normalize", lambda: la(q, k, v, normalize="no"))
    _raises("scale", lambda: la(q, k, v, scale="a"))
    _raises("head dim", lambda: la(q, k[..., :8], v))
    _raises("v must match k", lambda: la(q, k, v[:, :5]))
    _raises("heads of q", lambda: la(q[:, :, :3], k, v))
    _raises("batch", lambda: la(q, torch.cat([k, k]), torch.cat([v, v])))
    _raises("dtype", lambda: la(q, k.double(), v))
    _raises("q must be 4-D", lambda: la(q[0], k, v))
    _raises("cu_seqlens must be int32", lambda: la(q, k, v, cu_seqlens=torch.tensor([0, 10])))
    _raises("non-decreasing", lambda: la(q, k, v, cu_seqlens=torch.tensor([0, 6, 3, 10], dtype=torch.int32)))
    _raises("end at", lambda: la(q, k, v, cu_seqlens=torch.tensor([0, 6, 9], dtype=torch.int32)))
    _raises("start at 0", lambda: la(q, k, v, cu_seqlens=torch.tensor([1, 6, 10], dtype=torch.int32)))
    _raises("packed", lambda: la(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]),
                                 cu_seqlens=torch.tensor([0, 10], dtype=torch.int32)))
    # the raw ops check too (C++ messages name the argument)
    op = torch.ops.dtk.linear_attention
    _raises("feature_map", lambda: op(q, k, v, "tanh", True, 1e-4, None, None))
    _raises("eps", lambda: op(q, k, v, "elu1", True, 0.0, None, None))
    _raises("cu_seqlens", lambda: op(q, k, v, "elu1", True, 1e-4, None, torch.tensor([0, 7, 3, 10], dtype=torch.int32)))
    _raises("cu_seqlens", lambda: op(q, k, v, "elu1", True, 1e-4, None, torch.tensor([0, 3, 9], dtype=torch.int32)))
    st = dtk.linear_attention_state(k, v)
    _raises("feature_map", lambda: dtk.linear_attention_state(k, v, feature_map="x"))
    _raises("k_sum", lambda: dtk.linear_attention_apply(q, st[0], st[1][:, :1], st[2]))
    _raises("count must be int64", lambda: dtk.linear_attention_apply(q, st[0], st[1], st[2].int()))
    _raises("kv_sum must have q's head dim", lambda: dtk.linear_attention_apply(q[..., :8], *st))
    _raises("eps", lambda: dtk.linear_attention_apply(q, *st, eps=0))


def test_cu_seqlens_k_bad_inputs_name_it():
    q, k, v = _inputs(1, 10, 7, 4, 2, 16, 16, torch.float32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    bad = {  # cu_seqlens_k -> the message naming it (the wrapper's and the C++ op's alike)
        cu_k.long(): "cu_seqlens_k must be int32",
        cu_k[None]: "cu_seqlens_k must be 1-D",
        torch.tensor([0, 2, 3, 7], **i32): "cu_seqlens_k must describe as many sequences as cu_seqlens",
        torch.tensor([0, 3, 6], **i32): "cu_seqlens_k must end at the packed length 7",
        torch.tensor([0, 8, 7], **i32): "cu_seqlens_k must be non-decreasing",
        torch.tensor([1, 3, 7], **i32): "cu_seqlens_k must start at 0",
    }
    la = dtk.linear_attention
    op, bwd = torch.ops.dtk.linear_attention, torch.ops.dtk.linear_attention_backward
    g = torch.randn(1, 10, 4, 16)
    for t, msg in bad.items():
        _raises(msg, lambda: la(q, k, v, cu_seqlens=cu, cu_seqlens_k=t))
        _raises(msg, lambda: op(q, k, v, "elu1", True, 1e-4, None, cu, t))
        _raises(msg, lambda: bwd(g, q, k, v, "elu1", True, 1e-4, None, cu, t))
    _raises("cu_seqlens_k .*needs cu_seqlens", lambda: la(q, k, v, cu_seqlens_k=cu_k))
    _raises("cu_seqlens_k .*needs cu_seqlens", lambda: op(q, k, v, "elu1", True, 1e-4, None, None, cu_k))
    _raises("cu_seqlens_k .*needs cu_seqlens", lambda: bwd(g, q, k, v, "elu1", True, 1e-4, None, None, cu_k))
    # different totals without cu_seqlens_k: the shared packing cannot fit, the message says what to pass
    _raises("pass cu_seqlens_k", lambda: la(q, k, v, cu_seqlens=cu))
    _raises("pass cu_seqlens_k", lambda: op(q, k, v, "elu1", True, 1e-4, None, cu))


def test_gpu_entry_check_names_the_oversized_head_dim():
    """The check every CUDA call of the family runs first (its GPU test: test_triton_gpu.py)."""
    from dtk.ops.linear.engine import GPU_MAX_HEAD_DIM, can_run_triton
    q = torch.zeros(1, 2, 1, 8)
    assert can_run_triton("linear_attention", q, raise_error=True, q=GPU_MAX_HEAD_DIM, v=GPU_MAX_HEAD_DIM)
    assert not can_run_triton("linear_attention", q, q=64, v=257)
    with pytest.raises(ValueError, match=r"dtk.linear_attention: .*head dims up to 256, got v head dim 257"):
        can_run_triton("linear_attention", q, raise_error=True, q=64, v=257)


def test_cpu_calls_record_the_cpp_engine():
    q, k, v = _inputs(1, 6, 6, 2, 1, 8, 8, torch.float32)
    dtk.linear_attention(q, k, v)
    assert dtk.last_engine("linear_attention") == "cpp"
    dtk.linear_attention_state(k, v)
    assert dtk.last_engine("linear_attention_state") == "cpp"


def test_launch_params_follow_the_settings():
    """engine.launch_params reads dtk.config at the call; with autotune off a launcher gets only the
    first candidate configuration."""
    from dtk.ops.linear import engine
    with dtk.config(linear_state_ks_by_dot=False, linear_apply_den_by_dot=False, linear_programs_per_sm=4,
                    linear_state_atomic=False, autotune=False):
        p = engine.launch_params()
    assert (p.ks_dot, p.den_dot, p.programs_per_sm, p.atomic, p.autotune) == (False, False, 4, False, False)
    assert len(p.candidates("state", 128, 128, torch.bfloat16, gpu=True)) == 1
    assert len(engine.launch_params().candidates("state", 128, 128, torch.bfloat16, gpu=True)) > 1
