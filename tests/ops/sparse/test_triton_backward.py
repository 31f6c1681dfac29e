"""Triton backward of the sparse family (dq through the forward kernels with BWD, the dk/dv walks)
against float64 autograd through the dense references: in the interpreter on the CPU (fp32/fp16)."""
import os

import pytest
import torch

from dtk.ops.sparse.reference import multi_kv_attention_reference as mkv_ref
from dtk.ops.sparse.reference import segment_attention_reference as seg_ref

from ...helpers import assert_matches_reference, bshd
from .cases import multi_kv_case, random_q_index

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (CPU only)")


def _grads(fn, tensors, g, gl, dtype):
    """Gradients of sum(out * g) + sum(lse * gl) of fn(*leaves) with leaves = tensors in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    loss = (out * g.to(dtype)).sum() + (lse.to(dtype) * gl.to(dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def _compare(got, tensors, ref_fn, g, gl, dtype):
    r64 = _grads(ref_fn, tensors, g, gl, torch.float64)
    rlo = _grads(ref_fn, tensors, g, gl, dtype)
    for i, (a, b, c) in enumerate(zip(got, r64, rlo)):
        assert a.shape == b.shape and a.dtype == dtype, i
        assert_matches_reference(a, b, c, atol=2e-5 if dtype == torch.float32 else 2e-3, name=f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nseg", [1, 3, 6])
def test_multi_kv_backward(dtype, nseg):
    from dtk.ops.sparse.triton import multi_kv_attention_backward_triton, multi_kv_attention_triton
    q, ks, vs, kv_index = multi_kv_case(dtype, nseg)
    B, S, H, D = q.shape
    for q_index in (None, random_q_index(B, S, 7), torch.tensor([[3, 3, -1, 5], [0, 20, 20, 20]]),
                    torch.zeros(B, 0, dtype=torch.int64)):
        out, lse = multi_kv_attention_triton(q, ks, vs, kv_index, q_index, D ** -0.5)
        g = torch.randn_like(out)
        _, l64 = mkv_ref(q.double(), [k.double() for k in ks], [v.double() for v in vs], kv_index=kv_index,
                         q_index=q_index)
        gl = torch.randn_like(lse) * torch.isfinite(l64)
        dq, dks, dvs = multi_kv_attention_backward_triton(g, gl, q, ks, vs, kv_index, q_index, D ** -0.5, out, lse)

        def ref(q_, *kv):
            return mkv_ref(q_, list(kv[:nseg]), list(kv[nseg:]), kv_index=kv_index, q_index=q_index)
        _compare([dq, *dks, *dvs], [q, *ks, *vs], ref, g, gl, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [
    ([0, 5, 5, 30, 41], [[1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], True),   # empty branch
    ([0, 37], [[1]], False),
    ([0, 9, 20, 23], [[1, 0, 0], [1, 1, 0], [0, 0, 0]], False),                          # a branch that sees nothing
])
def test_segment_backward(dtype, layout):
    from dtk.ops.sparse.triton import segment_attention_backward_triton, segment_attention_triton
    cu, gm, with_bias = layout
    B, H, Hkv, D = 2, 4, 2, 16
    S = cu[-1]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    gm_t = torch.tensor(gm, dtype=torch.bool)
    gb = torch.randn(gm_t.shape) if with_bias else None
    q = bshd(B, S, H, D, dtype, transposed=True)
    k, v = bshd(B, S, Hkv, D, dtype), bshd(B, S, Hkv, D, dtype)
    out, lse = segment_attention_triton(q, k, v, cu_t, gm_t, gb, 0.3)
    g = torch.randn_like(out)
    _, l64 = seg_ref(q.double(), k.double(), v.double(), cu_t, gm_t, gb, scale=0.3)
    gl = torch.randn_like(lse) * torch.isfinite(l64)
    got = segment_attention_backward_triton(g, gl, q, k, v, cu_t, gm_t, gb, 0.3, out, lse)
    _compare(got, [q, k, v], lambda q_, k_, v_: seg_ref(q_, k_, v_, cu_t, gm_t, gb, scale=0.3), g, gl, dtype)
