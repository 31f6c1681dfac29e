"""Triton kernels under the interpreter (TRITON_INTERPRET=1) on CPU tensors, fp16/fp32 only (the
interpreter's bf16 tl.dot is wrong, docs/testing.md). Skipped where a GPU is present: there
test_triton_gpu.py runs the compiled kernels (the interpreter switch is process-wide). The kernels
are called through engine.py, which passes the dtk.config settings to the launchers."""
import importlib.util
import os
import random

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import dtk  # noqa: E402
from dtk.ops.linear import engine as tr  # noqa: E402
from dtk.ops.linear import launch as lc  # noqa: E402
from dtk.ops.linear import triton_common  # noqa: E402
from dtk.ops.linear.reference import (linear_attention_reference, linear_attention_state_reference,  # noqa: E402
                                      split_bounds)
from ...helpers import assert_matches_reference, bshd, cu_seqlens, max_err, qk_lengths  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _atol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-3


def _check_grads(got, rs, dtype):
    """Each of got (dq, dk, dv) against the float64 autograd gradient of rs."""
    for name, a, r in zip("qkv", got, rs):
        tol = (1e-4 if dtype == torch.float32 else 4e-3) * (1 + r.grad.abs().max().item())
        assert max_err(a, r.grad) < tol, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv,H,Hkv", [(40, 40, 2, 1), (64, 32, 2, 2), (80, 80, 4, 2), (160, 24, 1, 1)])
def test_forward(dtype, D, Dv, H, Hkv):
    Sq, Sk = random.randint(1, 150), random.randint(1, 150)
    strided = random.random() < 0.5
    q, k, v = bshd(2, Sq, H, D, dtype, transposed=strided), bshd(2, Sk, Hkv, D, dtype), bshd(2, Sk, Hkv, Dv, dtype)
    fm = random.choice(["elu1", "relu"])
    norm = random.random() < 0.7
    scale = random.choice([None, 0.3])
    kw = dict(feature_map=fm, normalize=norm, scale=scale)
    out = tr.linear_attention(q, k, v, fm, norm, 1e-4, scale)
    ref64 = linear_attention_reference(q.double(), k.double(), v.double(), **kw)
    atol = _atol(dtype) * (1 if norm else max(1.0, ref64.abs().max().item()))
    assert_matches_reference(out, ref64, linear_attention_reference(q, k, v, **kw), atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks_dot,den_dot", [(False, False), (True, False), (False, True)])
def test_forward_reduction_variants(dtype, ks_dot, den_dot):
    """The other ways the state and apply kernels reduce (linear_state_ks_by_dot,
    linear_apply_den_by_dot: what linear_sweep times against the defaults) against the float64
    reference; the state sums too."""
    q, k, v = bshd(2, 97, 2, 40, dtype), bshd(2, 130, 1, 40, dtype), bshd(2, 130, 1, 24, dtype)
    with dtk.config(linear_state_ks_by_dot=ks_dot, linear_apply_den_by_dot=den_dot):
        out = tr.linear_attention(q, k, v, "elu1", True, 1e-4, None)
        kv, ksum, _ = tr.linear_attention_state(k, v)
    ref64 = linear_attention_reference(q.double(), k.double(), v.double())
    assert_matches_reference(out, ref64, linear_attention_reference(q, k, v), atol=_atol(dtype))
    rkv, rks, _ = linear_attention_state_reference(k.double(), v.double())
    assert max_err(kv, rkv) <= 1e-3 * rkv.abs().max().item() and max_err(ksum, rks) <= 1e-3 * rks.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_and_states(dtype):
    cu = torch.tensor([0, 7, 7, 100, 130], dtype=torch.int32)
    q, k, v = (bshd(1, 130, 2, 64, dtype) for _ in range(3))
    out = tr.linear_attention(q, k, v, "elu1", True, 1e-4, None, cu)
    ref64 = linear_attention_reference(q.double(), k.double(), v.double(), cu_seqlens=cu)
    assert_matches_reference(out, ref64, linear_attention_reference(q, k, v, cu_seqlens=cu), atol=_atol(dtype))
    st = tr.linear_attention_state(k, v, "elu1", cu)
    rst = linear_attention_state_reference(k.double(), v.double(), "elu1", cu)
    assert st[2].tolist() == rst[2].tolist()
    assert max_err(st[0], rst[0]) < 1e-3 * (1 + rst[0].abs().max().item())
    # split into shards, merge, apply == whole
    k2, v2 = bshd(2, 300, 2, 64, dtype), bshd(2, 300, 2, 64, dtype)
    q2 = bshd(2, 40, 2, 64, dtype)
    parts = [tr.linear_attention_state(k2[:, s:e], v2[:, s:e]) for s, e in split_bounds(300, 3)]
    merged = tr.linear_attention_apply(q2, sum(p[0] for p in parts), sum(p[1] for p in parts),
                                              sum(p[2] for p in parts))
    whole = tr.linear_attention(q2, k2, v2)
    assert max_err(merged, whole) <= _atol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_backward(dtype, norm):
    q, k, v = bshd(2, 50, 4, 40, dtype), bshd(2, 70, 2, 40, dtype), bshd(2, 70, 2, 32, dtype)
    g = bshd(2, 50, 4, 32, dtype)
    dq, dk, dv = tr.linear_attention_backward(g, q, k, v, "elu1", norm, 1e-4, 0.5)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, normalize=norm, scale=0.5).backward(g.double())
    _check_grads((dq, dk, dv), rs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_packed_sequences(dtype):
    """The backward kernels on cu_seqlens packs (rows addressed in batch row 0)."""
    cu = torch.tensor([0, 13, 13, 60, 81], dtype=torch.int32)
    q, k, v = bshd(1, 81, 4, 40, dtype), bshd(1, 81, 2, 40, dtype), bshd(1, 81, 2, 32, dtype)
    g = bshd(1, 81, 4, 32, dtype)
    dq, dk, dv = tr.linear_attention_backward(g, q, k, v, "elu1", True, 1e-4, 0.5, cu_seqlens=cu)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, scale=0.5, cu_seqlens=cu).backward(g.double())
    _check_grads((dq, dk, dv), rs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_cu_seqlens_k(dtype, norm):
    """cu_seqlens packs q, cu_seqlens_k packs k and v (state pass over k's packing, apply pass over
    q's): different totals, zero-length sequences on either side, several chunks per sequence."""
    lq, lk = qk_lengths(5, 90)
    cu, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    D, Dv, H, Hkv = random.choice([(40, 40, 4, 2), (64, 32, 2, 1), (32, 48, 2, 2)])
    fm = random.choice(["elu1", "relu"] if norm else ["elu1", "relu", "identity"])
    scale = random.choice([None, 0.3])
    q, k, v = bshd(1, sum(lq), H, D, dtype), bshd(1, sum(lk), Hkv, D, dtype), bshd(1, sum(lk), Hkv, Dv, dtype)
    kw = dict(feature_map=fm, normalize=norm, scale=scale, cu_seqlens=cu, cu_seqlens_k=cu_k)
    out = tr.linear_attention(q, k, v, fm, norm, 1e-4, scale, cu, cu_k)
    ref64 = linear_attention_reference(q.double(), k.double(), v.double(), **kw)
    atol = _atol(dtype) * (1 if norm else max(1.0, ref64.abs().max().item()))
    assert_matches_reference(out, ref64, linear_attention_reference(q, k, v, **kw), atol=atol)
    bq, bk = cu.tolist(), cu_k.tolist()
    for i in range(len(lq)):
        if lq[i] == 0:
            continue
        rows = out[:, bq[i]:bq[i + 1]]
        alone = tr.linear_attention(q[:, bq[i]:bq[i + 1]], k[:, bk[i]:bk[i + 1]], v[:, bk[i]:bk[i + 1]], fm,
                                           norm, 1e-4, scale)
        assert max_err(rows, alone) <= atol, i
        if lk[i] == 0:
            assert not rows.any(), i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_backward_cu_seqlens_k(dtype, norm):
    """grad_q over q's packing, grad_kv over k's, with the per-sequence dS, dz between them."""
    lq, lk = qk_lengths(5, 80)
    cu, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    q, k, v = bshd(1, sum(lq), 4, 40, dtype), bshd(1, sum(lk), 2, 40, dtype), bshd(1, sum(lk), 2, 32, dtype)
    g = bshd(1, sum(lq), 4, 32, dtype)
    dq, dk, dv = tr.linear_attention_backward(g, q, k, v, "elu1", norm, 1e-4, 0.5, cu, cu_k)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, normalize=norm, scale=0.5, cu_seqlens=cu, cu_seqlens_k=cu_k).backward(g.double())
    _check_grads((dq, dk, dv), rs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv,H,Hkv", [(160, 160, 4, 2), (160, 40, 2, 2), (40, 300, 2, 1), (200, 24, 1, 1)])
def test_backward_wide_head_dims(dtype, D, Dv, H, Hkv):
    """Head dims whose D x Dv tiles do not fit on chip: the wide kernels (state read in Dv blocks,
    q-side reduction in its own pass), GQA, transposed q, both modes, a scale or none."""
    assert not lc.backward_whole_tiles(D, Dv)
    norm = random.random() < 0.7
    fm = random.choice(["elu1", "relu"])
    scale = random.choice([None, 0.5])
    q, k, v = bshd(2, 45, H, D, dtype, transposed=True), bshd(2, 70, Hkv, D, dtype), bshd(2, 70, Hkv, Dv, dtype)
    g = bshd(2, 45, H, Dv, dtype)
    got = tr.linear_attention_backward(g, q, k, v, fm, norm, 1e-4, scale)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, feature_map=fm, normalize=norm, scale=scale).backward(g.double())
    _check_grads(got, rs, dtype)


@pytest.mark.parametrize("norm", [True, False])
def test_backward_wide_cu_seqlens_k(norm):
    cu, cu_k = torch.tensor([0, 0, 9, 20, 77], dtype=torch.int32), torch.tensor([0, 6, 6, 30, 95], dtype=torch.int32)
    q, k, v = bshd(1, 77, 2, 160, torch.float16), bshd(1, 95, 1, 160, torch.float16), bshd(1, 95, 1, 160, torch.float16)
    g = bshd(1, 77, 2, 160, torch.float16)
    got = tr.linear_attention_backward(g, q, k, v, "elu1", norm, 1e-4, None, cu, cu_k)
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rs, normalize=norm, cu_seqlens=cu, cu_seqlens_k=cu_k).backward(g.double())
    _check_grads(got, rs, torch.float16)


def test_backward_wide_equals_whole_tiles():
    """At a head dim both paths serve, the wide kernels (forced) agree with the whole-tile ones."""
    q, k, v = bshd(2, 90, 4, 40, torch.float32), bshd(2, 110, 2, 40, torch.float32), bshd(2, 110, 2, 56, torch.float32)
    g = bshd(2, 90, 4, 56, torch.float32)
    whole = tr.linear_attention_backward(g, q, k, v, "elu1", True, 1e-4, 0.3)
    wide = tr.linear_attention_backward(g, q, k, v, "elu1", True, 1e-4, 0.3, wide=True)
    for a, b in zip(wide, whole):
        assert max_err(a, b) <= 1e-5 * (1 + b.abs().max().item())


def test_state_deterministic_mode():
    """Several chunks: fp32 atomics by default, per-chunk partials + a sum under
    torch.use_deterministic_algorithms or with linear_state_atomic off (bitwise reproducible); both
    equal the reference."""
    k, v = bshd(2, 300, 2, 64, torch.float32), bshd(2, 300, 2, 48, torch.float32)
    assert lc.chunking(300, 2 * 2, k.device, dtk._config.get("linear_programs_per_sm"))[0] > 1
    fast = tr.linear_attention_state(k, v)
    torch.use_deterministic_algorithms(True)
    try:
        det = [tr.linear_attention_state(k, v) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(det[0][0], det[1][0]) and torch.equal(det[0][1], det[1][1])
    ref = linear_attention_state_reference(k.double(), v.double())
    with dtk.config(linear_state_atomic=False):   # the slots and a sum by choice, as in deterministic mode
        slots = tr.linear_attention_state(k, v)
    assert torch.equal(slots[0], det[0][0]) and torch.equal(slots[1], det[0][1])
    for got in (fast, det[0]):
        assert max_err(got[0], ref[0]) < 1e-4 * (1 + ref[0].abs().max().item())
        assert max_err(got[1], ref[1]) < 1e-4 * (1 + ref[1].abs().max().item())


@pytest.mark.parametrize("D", [40, 160])   # whole-tile and wide backward
@pytest.mark.parametrize("separate_k", [False, True])
def test_packed_lengths_read_once_per_packing(D, separate_k, monkeypatch):
    """A packed call reads each packing's longest sequence to the host once (a device sync), in the
    forward and in the backward, however many kernels use it."""
    reads = []
    real = triton_common.seqs

    def counting(x, cu_seqlens, max_len=None):
        if cu_seqlens is not None and max_len is None:
            reads.append(1)
        return real(x, cu_seqlens, max_len)
    monkeypatch.setattr(triton_common, "seqs", counting)
    cu = torch.tensor([0, 5, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 30], dtype=torch.int32) if separate_k else None
    q = bshd(1, 40, 2, D, torch.float32)
    k, v = (bshd(1, 30 if separate_k else 40, 2, D, torch.float32) for _ in range(2))
    tr.linear_attention(q, k, v, "elu1", True, 1e-4, None, cu, cu_k)
    assert len(reads) == 1 + separate_k
    reads.clear()
    tr.linear_attention_backward(torch.randn_like(q), q, k, v, "elu1", True, 1e-4, None, cu, cu_k)
    assert len(reads) == 1 + separate_k


def test_engine_records_triton():
    k, v = bshd(1, 8, 1, 16, torch.float32), bshd(1, 8, 1, 16, torch.float32)
    tr.linear_attention_state(k, v)
    assert dtk.last_engine("linear_attention_state") == "triton"
