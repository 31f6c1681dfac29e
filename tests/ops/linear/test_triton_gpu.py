"""The compiled Triton kernels (CUDA key of torch.ops.dtk.*) in bf16/fp16 against the float64
reference. Runs only where a GPU is present (the lent GPU machine)."""
import random

import pytest
import torch

pytestmark = pytest.mark.gpu   # skipped without a GPU (conftest); selected by gpu_check's "-m gpu"

import dtk  # noqa: E402
from dtk.ops.linear.reference import linear_attention_reference, split_bounds  # noqa: E402
from ...helpers import assert_matches_reference, bshd, cu_seqlens, qk_lengths  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


def _ref(q, k, v, **kw):
    return (linear_attention_reference(q.double(), k.double(), v.double(), **kw),
            linear_attention_reference(q, k, v, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("fm", ["elu1", "relu"])
def test_forward(dtype, D, fm):
    H, Hkv = random.choice([(4, 4), (8, 2)])
    Sq, Sk = random.choice([(1, 1), (333, 4097), (4096, 4096), (10000, 777)])
    q = bshd(2, Sq, H, D, dtype, "cuda", transposed=True)
    k, v = bshd(2, Sk, Hkv, D, dtype, "cuda"), bshd(2, Sk, Hkv, D, dtype, "cuda")
    for norm in (True, False):
        out = dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm)
        ref64, ref = _ref(q, k, v, feature_map=fm, normalize=norm)
        assert_matches_reference(out, ref64, ref, atol=1e-3 * (1 if norm else max(1.0, ref64.abs().max().item())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_and_shards(dtype):
    lens = [random.randint(0, 3000) for _ in range(5)]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T = int(cu[-1])
    q, k, v = (bshd(1, T, 4, 64, dtype, "cuda") for _ in range(3))
    out = dtk.linear_attention(q, k, v, cu_seqlens=cu)
    ref64, ref = _ref(q, k, v, cu_seqlens=cu)
    assert_matches_reference(out, ref64, ref, atol=1e-3)
    S = 20000
    k2, v2, q2 = bshd(1, S, 4, 128, dtype, "cuda"), bshd(1, S, 4, 128, dtype, "cuda"), bshd(1, 999, 4, 128, dtype, "cuda")
    st = [dtk.linear_attention_state(k2[:, s:e], v2[:, s:e]) for s, e in split_bounds(S, 4)]
    merged = dtk.linear_attention_apply(q2, *(sum(x[i] for x in st) for i in range(3)))
    ref64, ref = _ref(q2, k2, v2)
    assert_matches_reference(merged, ref64, ref, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("D", [64, 160])   # 160: the wide kernels (state in Dv blocks)
def test_backward(dtype, norm, D):
    q, k, v = bshd(2, 1000, 8, D, dtype, "cuda"), bshd(2, 1500, 4, D, dtype, "cuda"), bshd(2, 1500, 4, D, dtype, "cuda")
    g = bshd(2, 1000, 8, D, dtype, "cuda")
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    dtk.linear_attention(*ts, normalize=norm).backward(g)
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*r64, normalize=norm).backward(g.double())
    rl = [t.clone().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rl, normalize=norm).backward(g)
    for name, a, b, c in zip("qkv", ts, r64, rl):
        assert_matches_reference(a.grad, b.grad, c.grad, atol=1e-3 * (1 + b.grad.abs().max().item()), name="d" + name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cu_seqlens_k(dtype):
    """cu_seqlens packs q, cu_seqlens_k packs k and v (different totals, zero-length sequences on
    either side): forward in both modes and the backward, through the CUDA key."""
    lq, lk = qk_lengths(6, 3000)
    cu, cu_k = cu_seqlens(lq, "cuda"), cu_seqlens(lk, "cuda")
    q = bshd(1, sum(lq), 8, 64, dtype, "cuda", transposed=True)
    k, v = bshd(1, sum(lk), 2, 64, dtype, "cuda"), bshd(1, sum(lk), 2, 64, dtype, "cuda")
    kw = dict(cu_seqlens=cu, cu_seqlens_k=cu_k)
    for norm in (True, False):
        out = dtk.linear_attention(q, k, v, normalize=norm, **kw)
        ref64, ref = _ref(q, k, v, normalize=norm, **kw)
        assert_matches_reference(out, ref64, ref, atol=1e-3 * (1 if norm else max(1.0, ref64.abs().max().item())))
    g = bshd(1, sum(lq), 8, 64, dtype, "cuda")
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    dtk.linear_attention(*ts, **kw).backward(g)
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*r64, **kw).backward(g.double())
    rl = [t.clone().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*rl, **kw).backward(g)
    for name, a, b, c in zip("qkv", ts, r64, rl):
        assert_matches_reference(a.grad, b.grad, c.grad, atol=1e-3 * (1 + b.grad.abs().max().item()), name="d" + name)
    # the raw CUDA op rejects packings its kernels would index past
    with pytest.raises(ValueError, match="cu_seqlens_k must describe as many sequences"):
        torch.ops.dtk.linear_attention(q, k, v, "elu1", True, 1e-4, None, cu, cu_k[:-1])
    with pytest.raises(ValueError, match="cu_seqlens_k .*needs cu_seqlens"):
        torch.ops.dtk.linear_attention_backward(g, q, k, v, "elu1", True, 1e-4, None, None, cu_k)


def test_float64_is_cpu_only():
    """The GPU kernels accumulate in float32: float64 CUDA inputs are an error naming the op, not
    float32 results (and states unlike the fakes' float64)."""
    q = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="linear_attention: float64 is CPU-only"):
        dtk.linear_attention(q, q, q)
    with pytest.raises(TypeError, match="linear_attention_state: float64 is CPU-only"):
        dtk.linear_attention_state(q, q)


def test_head_dim_above_gpu_limit_is_rejected():
    q = bshd(1, 64, 2, 264, torch.bfloat16, "cuda")
    v = bshd(1, 64, 2, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="head dims up to 256, got q head dim 264"):
        dtk.linear_attention(q, q, v)
    with pytest.raises(ValueError, match="head dims up to 256, got v head dim 300"):
        dtk.linear_attention(v, v, bshd(1, 64, 2, 300, torch.bfloat16, "cuda"))
