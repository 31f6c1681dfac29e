"""GPU checks of the sparse and cache families (bf16/fp16 through the ops: Triton kernels)."""
import pytest
import torch

import dtk
from dtk.ops.reuse.reference import scatter_blend_reference
from dtk.ops.sparse.reference import multi_kv_attention_reference as mkv_ref
from dtk.ops.sparse.reference import segment_attention_reference as seg_ref

from ...helpers import assert_matches_reference, graph_replay_equals_eager

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def _r(*shape, dtype, tr=False):
    if tr:
        return torch.randn(shape[0], shape[2], shape[1], shape[3], device="cuda", dtype=dtype).transpose(1, 2)
    return torch.randn(*shape, device="cuda", dtype=dtype)


def _d(ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("nseg", [3, 5])
def test_multi_kv_spotedit_like(dtype, D, nseg):
    B, H, Hkv = 1, 4, 2
    S = 512 + 1024
    lens = [512, 1024, 1024, 300, 77][:nseg]
    q = _r(B, S, H, D, dtype=dtype, tr=True)
    ks = [_r(B, L, Hkv, D, dtype=dtype) for L in lens]
    vs = [_r(B, L, Hkv, D, dtype=dtype) for L in lens]
    kvi = [None] * nseg
    kvi[1] = torch.randperm(1024, device="cuda")[:600]
    mask = torch.rand(B, 1024, device="cuda") < 0.3
    qi, cnt = dtk.mask_to_index(mask, num_prefix=512)
    out = _r(B, S, H, D, dtype=dtype)
    before = out.clone()
    dtk.multi_kv_attention(q, ks, vs, kv_index=kvi, q_index=qi, out=out)
    torch.cuda.synchronize()
    sel = torch.cat([torch.ones(B, 512, dtype=torch.bool, device="cuda"), mask], 1)
    assert torch.equal(out[~sel], before[~sel])
    r64, _ = mkv_ref(q.double(), _d(ks), _d(vs), kv_index=kvi, q_index=qi, out=before.double())
    rlo, _ = mkv_ref(q, ks, vs, kv_index=kvi, q_index=qi, out=before)
    assert_matches_reference(out, r64, rlo, atol=2e-3)
    o, lse = dtk.multi_kv_attention(q, ks, vs, kv_index=kvi, q_index=qi, return_lse=True)
    assert o.shape == (B, qi.shape[1], H, D)
    assert torch.equal(o[0, int(cnt[0]):].float().abs().sum().bool().view(1), torch.tensor([False], device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["device-gqa", "host-mha"])
def test_segment_ominicontrol(dtype, layout):
    """Branch layout on the GPU (Triton engine; GQA) or on the CPU with MHA (cuDNN engine)."""
    dev = "cuda" if layout == "device-gqa" else "cpu"
    cu = torch.tensor([0, 128, 128 + 1024, 128 + 2048, 128 + 2048 + 500], dtype=torch.int32, device=dev)
    S = int(cu[-1])
    gm = dtk.ominicontrol_group_mask(2, device=dev)
    gb = torch.zeros(4, 4, device=dev)
    gb[1, 2:] = -0.7
    q = _r(1, S, 4, 128, dtype=dtype, tr=True)
    hkv = 2 if layout == "device-gqa" else 4
    k, v = _r(1, S, hkv, 128, dtype=dtype), _r(1, S, hkv, 128, dtype=dtype)
    o, lse = dtk.segment_attention(q, k, v, cu, gm, gb, return_lse=True)
    r64, l64 = seg_ref(q.double(), k.double(), v.double(), cu.cpu(), gm, gb.double())
    rlo, _ = seg_ref(q, k, v, cu.cpu(), gm, gb.to(dtype))
    assert_matches_reference(o, r64, rlo, atol=2e-3)
    assert (lse.double() - l64).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_blend_gpu(dtype):
    base = torch.randn(2, 4096, 3072, device="cuda", dtype=dtype)
    cache = torch.randn_like(base)
    idx = torch.stack([torch.randperm(4096, device="cuda")[:1200] for _ in range(2)])
    fresh = torch.randn(2, 1200, 3072, device="cuda", dtype=dtype)
    lam = torch.tensor([0.2, 0.6], device="cuda")
    ref, ref_cache = scatter_blend_reference(base, cache, fresh, idx, lam)
    out = dtk.scatter_blend(base, cache, fresh, idx, lam)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_gpu_indices_checked_on_request(monkeypatch):
    """GPU indices are not read by default (no host sync); DTK_CHECK_INDICES=1 validates them."""
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    ks, vs = [torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)], [torch.randn(1, 8, 2, 64, device="cuda",
                                                                                            dtype=torch.bfloat16)]
    bad_q = torch.tensor([[0, 16]], device="cuda")
    base = torch.randn(1, 8, 4, device="cuda")
    dup = torch.tensor([[1, 3, 1]], device="cuda")
    fresh = torch.randn(1, 3, 4, device="cuda")
    dtk.multi_kv_attention(q, ks, vs, q_index=bad_q)                # skipped like padding, no sync
    monkeypatch.setenv("DTK_CHECK_INDICES", "1")
    with pytest.raises(IndexError, match="q_index out of range"):
        dtk.multi_kv_attention(q, ks, vs, q_index=bad_q)
    with pytest.raises(IndexError, match=r"kv_index\[0\] out of range"):
        dtk.multi_kv_attention(q, ks, vs, kv_index=[torch.tensor([8], device="cuda")])
    with pytest.raises(ValueError, match="duplicate entry 1"):
        dtk.scatter_blend(base, base.clone(), fresh, dup, 0.5)


def test_mask_ops_on_gpu():
    m = torch.rand(2, 64, 64, device="cuda") < 0.3
    idx, cnt = dtk.mask_to_index(m, num_prefix=512)
    assert idx.is_cuda and cnt.is_cuda and idx.dtype == torch.int32
    assert torch.equal(cnt.cpu(), (m.flatten(1).sum(1) + 512).int().cpu())
    assert dtk.dilate_mask(m).is_cuda and dtk.prune_isolated(m).is_cuda
    feats = [torch.randn(2, 16, 64, 64, device="cuda"), torch.randn(2, 8, 32, 32, device="cuda")]
    assert dtk.token_change_score(feats, [f + 0.1 for f in feats]).shape == (2, 32, 32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_kv_dense_segments_cudnn_and_triton_engines(dtype, monkeypatch):
    """Dense MHA segments go to the cuDNN engine (per-segment cuDNN + lse merge); it and the Triton
    engine both match the reference, lse included (natural log), compact and scattered."""
    import warnings

    from dtk.ops.sparse.engine import can_run_cudnn

    B, S, H, D = 2, 1000, 4, 128
    q = _r(B, S, H, D, dtype=dtype, tr=True)
    lens = [512, 700]
    ks = [_r(B, L, H, D, dtype=dtype) for L in lens]
    vs = [_r(B, L, H, D, dtype=dtype, tr=True) for L in lens]
    assert can_run_cudnn(q, ks, [None, None])
    r64, l64 = mkv_ref(q.double(), _d(ks), _d(vs))
    rlo, _ = mkv_ref(q, ks, vs)
    qi = torch.stack([torch.randperm(S, device="cuda")[:300] for _ in range(B)])
    qi[:, -7:] = -1
    for engine in ("cudnn", "triton"):
        monkeypatch.setenv("DTK_SPARSE_ENGINE", engine)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)   # no fallback: the pinned engine served
            o, lse = dtk.multi_kv_attention(q, ks, vs, return_lse=True)
        assert dtk.last_engine("multi_kv_attention") == engine
        assert_matches_reference(o, r64, rlo, atol=2e-3)
        assert (lse.double() - l64).abs().max() < 2e-2, engine
        out = _r(B, S, H, D, dtype=dtype)
        before = out.clone()
        dtk.multi_kv_attention(q, ks, vs, q_index=qi, out=out)
        assert dtk.last_engine("multi_kv_attention_out") == engine
        sel = torch.zeros(B, S, dtype=torch.bool, device="cuda")
        for b in range(B):
            sel[b, qi[b][qi[b] >= 0]] = True
        assert torch.equal(out[~sel], before[~sel]), engine
        rs64, _ = mkv_ref(q.double(), _d(ks), _d(vs), q_index=qi, out=before.double())
        rslo, _ = mkv_ref(q, ks, vs, q_index=qi, out=before)
        assert_matches_reference(out, rs64, rslo, atol=2e-3)
    with warnings.catch_warnings():    # "auto" takes cuDNN here, and it runs
        warnings.simplefilter("error", RuntimeWarning)
        dtk.multi_kv_attention(q, ks, vs, engine="auto")
    assert dtk.last_engine("multi_kv_attention") == "cudnn"


def _grads(fn, tensors, g, gl):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    loss = (out * g.to(out.dtype)).sum() + (lse * gl).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ["auto", "triton"])
def test_multi_kv_backward_gpu(dtype, engine, monkeypatch):
    """Autograd through multi_kv_attention (forward by cuDNN or Triton, Triton backward), q_index
    and kv_index included, against float64 autograd through the reference."""
    monkeypatch.setenv("DTK_SPARSE_ENGINE", engine)
    B, H, D = 1, 4, 128
    lens = [512, 1024, 700]
    q = _r(B, 1536, H, D, dtype=dtype, tr=True)
    ks = [_r(B, L, H, D, dtype=dtype) for L in lens]
    vs = [_r(B, L, H, D, dtype=dtype) for L in lens]
    kvi = [None, None, torch.randint(0, 700, (300,), device="cuda")] if engine == "triton" else None
    qi = torch.sort(torch.randperm(1536, device="cuda")[:400])[0][None] if engine == "triton" else None
    n = 3

    def op(q_, *kv):
        return dtk.multi_kv_attention(q_, kv[:n], kv[n:], kv_index=kvi, q_index=qi, return_lse=True)

    def ref(q_, *kv):
        return mkv_ref(q_, list(kv[:n]), list(kv[n:]), kv_index=kvi, q_index=qi)
    tensors = [q, *ks, *vs]
    with torch.no_grad():
        out, _ = op(*tensors)
    g = torch.randn(out.shape, device="cuda")
    gl = torch.randn(B, H, out.shape[1], device="cuda")
    got = _grads(op, tensors, g, gl)
    r64 = _grads(ref, [t.double() for t in tensors], g, gl)
    rlo = _grads(ref, tensors, g, gl)
    for i, (a, b, c) in enumerate(zip(got, r64, rlo)):
        assert_matches_reference(a, b, c, atol=2e-3, name=f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_backward_gpu(dtype):
    B, H, Hkv, D = 1, 4, 2, 128
    cu = torch.tensor([0, 512, 1536, 2048], dtype=torch.int32, device="cuda")
    gm = dtk.ominicontrol_group_mask(1, device="cuda")
    gb = torch.zeros(3, 3, device="cuda")
    gb[1, 2] = -0.7
    q = _r(B, 2048, H, D, dtype=dtype, tr=True)
    k, v = _r(B, 2048, Hkv, D, dtype=dtype), _r(B, 2048, Hkv, D, dtype=dtype)

    def op(q_, k_, v_):
        return dtk.segment_attention(q_, k_, v_, cu, gm, gb, return_lse=True)

    def ref(q_, k_, v_):
        return seg_ref(q_, k_, v_, cu.cpu(), gm.cpu(), gb.cpu())
    g = torch.randn(B, 2048, H, D, device="cuda")
    gl = torch.randn(B, H, 2048, device="cuda")
    got = _grads(op, [q, k, v], g, gl)
    r64 = _grads(ref, [q.double(), k.double(), v.double()], g, gl)
    rlo = _grads(ref, [q, k, v], g, gl)
    for i, (a, b, c) in enumerate(zip(got, r64, rlo)):
        assert_matches_reference(a, b, c, atol=2e-3, name=f"grad {i}")


def test_dense_calls_on_side_streams_and_in_cuda_graphs():
    """The cuDNN engine's calls of one op run on side streams at once; the result is the same as
    one call after another, and under CUDA graph capture (the caller's stream alone) a replay
    with new inputs gives the eager result."""
    from dtk.ops._attention import dense as _dense

    B, S, H, D = 1, 700, 4, 128
    q = _r(B, S, H, D, dtype=torch.bfloat16)
    lens = [128, 900, 900, 333]
    ks = [_r(B, L, H, D, dtype=torch.bfloat16) for L in lens]
    vs = [_r(B, L, H, D, dtype=torch.bfloat16) for L in lens]
    calls = [(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) for k, v in zip(ks, vs)]
    together = _dense.dense_with_lse_concurrent(calls, 0.1)
    one_by_one = [_dense.dense_with_lse(*c, 0.1) for c in calls]
    for (o1, l1), (o2, l2) in zip(together, one_by_one):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)

    assert graph_replay_equals_eager(lambda x: dtk.multi_kv_attention(x, ks, vs), q)
