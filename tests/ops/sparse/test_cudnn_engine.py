"""The cuDNN engine of multi_kv_attention (ops/sparse/cudnn.py): per-segment dense attention with
lse, merged exactly by one Triton pass that also writes compact rows or scatters into `out`.
On the CPU it runs with torch's CPU flash attention as the dense kernel and the merge kernel in the
interpreter, so the gather / merge / scatter logic is checked here against the float64 reference;
on a GPU the same tests run the real cuDNN calls (bf16 too)."""
import pytest
import torch

from dtk.ops.sparse.cudnn import multi_kv_attention_cudnn
from dtk.ops.sparse.engine import MAX_SEGMENTS, can_run_cudnn as supported
from dtk.ops.sparse.reference import multi_kv_attention_reference

from ...helpers import assert_matches_reference

pytestmark = pytest.mark.triton_engine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32]


def _inputs(B, S, H, D, lens, dtype, transposed=True):
    g = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)  # noqa: E731
    q = g(B, H, S, D).transpose(1, 2) if transposed else g(B, S, H, D)
    ks = [g(B, L, H, D) for L in lens]
    vs = [g(B, H, L, D).transpose(1, 2) for L in lens]
    return q, ks, vs


def _check(out, lse, q, ks, vs, q_index, scale, atol):
    ref = lambda dt: multi_kv_attention_reference(  # noqa: E731
        q.to(dt), [k.to(dt) for k in ks], [v.to(dt) for v in vs], None, q_index, scale)
    (r64, l64), (rlow, llow) = ref(torch.float64), ref(q.dtype)
    assert_matches_reference(out, r64, rlow, atol=atol)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_matches_reference(lse[fin], l64[fin], llow[fin].float(), atol=1e-3, name="lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[37], [0, 19, 64], [5, 0, 33, 70]], ids=str)
def test_segments_merge_to_the_concatenation(lens, dtype):
    q, ks, vs = _inputs(2, 45, 3, 64, lens, dtype)
    out, lse = multi_kv_attention_cudnn(q, ks, vs, None, 0.3)
    _check(out, lse, q, ks, vs, None, 0.3, 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_queries_compact_and_padding(dtype):
    q, ks, vs = _inputs(2, 40, 2, 32, [16, 24], dtype, transposed=False)
    qi = torch.tensor([[3, -1, 39, 0, 7], [12, 12, -1, 5, -1]], device=DEVICE, dtype=torch.int32)
    out, lse = multi_kv_attention_cudnn(q, ks, vs, qi, 32 ** -0.5)
    _check(out, lse, q, ks, vs, qi, 32 ** -0.5, 1e-5 if dtype == torch.float32 else 2e-3)
    pad = qi < 0
    assert (out[pad] == 0).all() and torch.isinf(lse.transpose(1, 2)[pad]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_into_out_leaves_other_rows_bit_identical(dtype):
    q, ks, vs = _inputs(1, 50, 2, 64, [30, 9, 41], dtype)
    qi = torch.tensor([[49, 2, -1, 17, 30]], device=DEVICE)
    out = torch.randn(1, 50, 2, 64, device=DEVICE, dtype=dtype)
    before = out.clone()
    res, lse = multi_kv_attention_cudnn(q, ks, vs, qi, 0.125, out=out)
    assert res is out
    rows = qi[0][qi[0] >= 0]
    untouched = torch.ones(50, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(out[:, untouched], before[:, untouched])
    compact, _ = multi_kv_attention_cudnn(q, ks, vs, qi, 0.125)
    assert torch.equal(out[0, rows], compact[0, qi[0] >= 0])


def test_empty_index_and_all_empty_segments():
    q, ks, vs = _inputs(1, 8, 2, 16, [0, 0], DTYPES[0])
    out, lse = multi_kv_attention_cudnn(q, ks, vs, None, 0.25)
    assert (out == 0).all() and torch.isinf(lse).all()
    qi = torch.zeros(1, 0, dtype=torch.int64, device=DEVICE)
    out, lse = multi_kv_attention_cudnn(q, *_inputs(1, 8, 2, 16, [4], DTYPES[0])[1:], qi, 0.25)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)


def test_supported_calls():
    """What the engine takes on a GPU; the rest goes to the Triton engine."""
    meta = lambda *s, dt=torch.bfloat16: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    q, k = meta(1, 8, 4, 128), meta(1, 8, 4, 128)
    assert not supported(q, [k], [None])                       # meta is not CUDA
    fake_cuda = type("T", (), {})  # attribute bag standing for a CUDA tensor
    def cuda_like(t):
        x = fake_cuda()
        x.is_cuda, x.dtype, x.shape = True, t.dtype, t.shape
        return x
    cq, ck = cuda_like(q), cuda_like(k)
    assert supported(cq, [ck], [None])
    assert not supported(cq, [ck], [torch.zeros(3)])            # indexed segment
    assert not supported(cq, [ck] * (MAX_SEGMENTS + 1), [None] * (MAX_SEGMENTS + 1))
    assert not supported(cq, [cuda_like(meta(1, 8, 2, 128))], [None])   # GQA
    assert not supported(cuda_like(meta(1, 8, 4, 160)), [cuda_like(meta(1, 8, 4, 160))], [None])
    assert not supported(cuda_like(meta(1, 8, 4, 64, dt=torch.float32)), [ck], [None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_segment_runs_merge_to_the_masked_reference(dtype, bias):
    """segment_attention per (query branch, run of adjacent visible key branches with one bias):
    empty branches, a branch that sees nothing, non-adjacent visible branches, > 4 runs (staged
    merge), biases shifting a run's lse."""
    from dtk.ops.sparse.cudnn import segment_attention_cudnn
    from dtk.ops.sparse.reference import segment_attention_reference as seg_ref

    cu = torch.tensor([0, 5, 5, 22, 30, 41, 47, 52, 60, 66, 70], dtype=torch.int32)
    G = cu.numel() - 1
    gm = torch.rand(G, G) > 0.35
    gm[0] = True                               # all key branches: runs split only by the bias
    gm[1] = torch.arange(G) % 2 == 0           # every other branch: 5 runs (> MAX_PARTS)
    gm[3] = False                              # sees nothing
    gb = (torch.randn(G, G) * (torch.rand(G, G) > 0.5)) if bias else None
    S = int(cu[-1])
    q, k, v = (torch.randn(1, S, 2, 32, device=DEVICE, dtype=dtype) for _ in range(3))
    o, lse = segment_attention_cudnn(q, k, v, cu, gm, gb, 0.2)
    r64, l64 = seg_ref(q.double(), k.double(), v.double(), cu, gm, None if gb is None else gb.double(), scale=0.2)
    rlo, llo = seg_ref(q, k, v, cu, gm, None if gb is None else gb.to(dtype), scale=0.2)
    assert_matches_reference(o, r64, rlo, atol=1e-5 if dtype == torch.float32 else 2e-3)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_matches_reference(lse[fin], l64[fin], llo[fin].float(), atol=1e-3, name="lse")
    rows3 = slice(int(cu[3]), int(cu[4]))
    assert (o[:, rows3] == 0).all()
