"""The Triton engine of the sparse family on the CPU under TRITON_INTERPRET=1 (fp16/fp32; the
interpreter's tl.dot is wrong for bf16), called directly (the ops dispatch to it on CUDA only)."""
import os

import pytest
import torch

from dtk.ops.sparse.reference import multi_kv_attention_reference as mkv_ref
from dtk.ops.sparse.reference import segment_attention_reference as seg_ref

from ...helpers import assert_matches_reference, bshd
from .cases import multi_kv_case, random_q_index, segments

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (CPU only)")


def _d(ts):
    return None if ts is None else [None if t is None else t.double() for t in ts]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nseg", [1, 3, 6])
def test_multi_kv_triton(dtype, nseg):
    from dtk.ops.sparse.triton import multi_kv_attention_triton
    q, ks, vs, kv_index = multi_kv_case(dtype, nseg)
    B, S, H, D = q.shape
    for q_index in (None, random_q_index(B, S, 7), torch.zeros(B, 0, dtype=torch.int64)):
        o, lse = multi_kv_attention_triton(q, ks, vs, kv_index, q_index, D ** -0.5)
        r64, l64 = mkv_ref(q.double(), _d(ks), _d(vs), kv_index=kv_index, q_index=q_index)
        rlo, _ = mkv_ref(q, ks, vs, kv_index=kv_index, q_index=q_index)
        assert_matches_reference(o, r64, rlo, atol=_tol(dtype))
        fin = torch.isfinite(l64)
        assert torch.equal(torch.isfinite(lse), fin)
        if fin.any():
            assert (lse[fin].double() - l64[fin]).abs().max() < 1e-3


@pytest.mark.parametrize("nseg", [2, 5, 18])
def test_multi_kv_triton_scatter_in_place(nseg):
    """18 segments: 5 groups of partials, merged in two stages (merge.py)."""
    from dtk.ops.sparse.triton import multi_kv_attention_triton
    B, S, H, D = 2, 40, 2, 16
    q = bshd(B, S, H, D, torch.float16)
    ks, vs = segments(B, ([13, 20, 7, 9, 3] * 4)[:nseg], 1, D, torch.float16)
    qi = random_q_index(B, S, 11).to(torch.int32)
    out = torch.randn(B, S, H, D, dtype=torch.float16)
    before = out.clone()
    multi_kv_attention_triton(q, ks, vs, None, qi, D ** -0.5, out=out)
    touched = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        touched[b, qi[b][qi[b] >= 0].long()] = True
    assert torch.equal(out[~touched], before[~touched])
    r64, _ = mkv_ref(q.double(), _d(ks), _d(vs), q_index=qi, out=before.double())
    rlo, _ = mkv_ref(q, ks, vs, q_index=qi, out=before)
    assert_matches_reference(out, r64, rlo, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_segment_triton(dtype, bias):
    from dtk.ops.sparse.triton import segment_attention_triton
    cu = torch.tensor([0, 5, 5, 22, 40, 47], dtype=torch.int32)   # incl. an empty branch
    G = 5
    gm = torch.rand(G, G) > 0.4
    gm[3] = False                                                  # a branch that sees nothing
    gb = torch.randn(G, G) if bias else None
    q = bshd(1, 47, 4, 16, dtype, transposed=True)
    k, v = bshd(1, 47, 2, 16, dtype), bshd(1, 47, 2, 16, dtype)
    o, lse = segment_attention_triton(q, k, v, cu, gm, gb, 16 ** -0.5)
    r64, l64 = seg_ref(q.double(), k.double(), v.double(), cu, gm, None if gb is None else gb.double())
    rlo, _ = seg_ref(q, k, v, cu, gm, None if gb is None else gb.to(dtype))
    assert_matches_reference(o, r64, rlo, atol=_tol(dtype))
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin].double() - l64[fin]).abs().max() < 1e-3
