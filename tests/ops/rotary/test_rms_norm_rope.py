"""dtk.rms_norm_rope (per-head norm, and the across-heads norm of Wan) against its float64
reference and diffusers' composition: the C++ CPU kernel (all dtypes), the Triton kernel under the interpreter (fp32/fp16/bf16), strided inputs, gradients,
opcheck, torch.compile, bad input."""
import os

import pytest
import torch

import dtk
from dtk.ops.rotary.reference import rms_norm_rope_reference

from ...helpers import assert_matches_reference

HEAD_DIMS = [40, 64, 80, 128, 160]
interpreter_only = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="interpreter test (CPU only)")


def _tables(S, D, dtype=torch.float32, interleaved=True):
    """FLUX-style (S, D) tables: one angle per pair, repeated over the pair's two slots."""
    ang = torch.randn(S, D // 2, dtype=torch.float64) * 3
    rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat([t, t], -1))
    return rep(ang.cos()).to(dtype), rep(ang.sin()).to(dtype)


def _x(B, S, H, D, dtype, layout):
    if layout == "bshd":
        return torch.randn(B, S, H, D, dtype=dtype)
    if layout == "sdpa":   # (B, H, S, D) seen as BSHD
        return torch.randn(B, H, S, D, dtype=dtype).transpose(1, 2)
    # a slice of a fused projection: (B, S, 3 * H * D) -> the k third, unflattened
    return torch.randn(B, S, 3 * H * D, dtype=dtype)[..., H * D:2 * H * D].unflatten(-1, (H, D))


def _check(run, dtype, D, layout="bshd", interleaved=True, weight=True, rope=True, B=2, S=9, H=3, across=False):
    x = _x(B, S, H, D, dtype, layout) * 2 + 0.5
    w = torch.randn(H * D if across else D) if weight else None
    cos, sin = _tables(S, D, interleaved=interleaved) if rope else (None, None)
    out = run(x, w, cos, sin, interleaved, across)
    ref64 = rms_norm_rope_reference(x.double(), w, cos, sin, interleaved=interleaved, across_heads=across)
    ref_lowp = rms_norm_rope_reference(x, w, cos, sin, interleaved=interleaved, compute_dtype=x.dtype,
                                       across_heads=across)
    assert out.is_contiguous() and out.dtype == x.dtype
    assert_matches_reference(out, ref64, ref_lowp)


def _op(x, w, cos, sin, interleaved, across):
    return dtk.rms_norm_rope(x, w, cos, sin, interleaved=interleaved, across_heads=across)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])
def test_cpu_kernel(dtype, D, across):
    _check(_op, dtype, D, across=across)


@pytest.mark.parametrize("layout", ["sdpa", "fused_qkv"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("weight,rope", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])
def test_cpu_kernel_variants(layout, interleaved, weight, rope, across):
    _check(_op, torch.float32, 64, layout, interleaved, weight, rope, across=across)


@pytest.mark.parametrize("interleaved", [True, False])
def test_equals_diffusers(interleaved):
    """FLUX's QK-norm and RoPE as diffusers runs them (RMSNorm, then apply_rotary_emb)."""
    emb = pytest.importorskip("diffusers.models.embeddings")
    norm_mod = pytest.importorskip("diffusers.models.normalization")
    B, S, H, D = 2, 11, 4, 128
    x = torch.randn(B, S, H * D).unflatten(-1, (H, D))
    norm = norm_mod.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    cos, sin = _tables(S, D, interleaved=interleaved)
    want = emb.apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1, use_real_unbind_dim=-1 if interleaved else -2)
    got = dtk.rms_norm_rope(x, norm.weight, cos, sin, eps=1e-6, interleaved=interleaved)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_and_single_element_rows():
    assert dtk.rms_norm_rope(torch.randn(2, 0, 3, 8)).shape == (2, 0, 3, 8)
    x = torch.randn(1, 3, 2, 1)
    torch.testing.assert_close(dtk.rms_norm_rope(x), x / torch.sqrt(x * x + 1e-6))


@interpreter_only
@pytest.mark.triton_engine
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])   # no tl.dot: bf16 is exact here
@pytest.mark.parametrize("D", [40, 128])
@pytest.mark.parametrize("layout,interleaved,weight,rope,across",
                         [("bshd", True, True, True, False), ("sdpa", False, True, True, False),
                          ("fused_qkv", True, False, True, False), ("bshd", True, True, False, False),
                          ("fused_qkv", True, True, True, True), ("sdpa", False, False, True, True)])
def test_triton_kernel(dtype, D, layout, interleaved, weight, rope, across):
    from dtk.ops.rotary.triton import rms_norm_rope_triton
    _check(lambda x, w, c, s, il, ac: rms_norm_rope_triton(x, w, c, s, 1e-6, il, ac), dtype, D, layout, interleaved,
           weight, rope, S=13, across=across)


@pytest.mark.parametrize("interleaved", [True, False])
def test_gradients(interleaved):
    B, S, H, D = 2, 5, 2, 8
    x = torch.randn(B, S, H, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double().requires_grad_() for t in _tables(S, D, interleaved=interleaved))
    assert torch.autograd.gradcheck(lambda *a: dtk.rms_norm_rope(*a, interleaved=interleaved), (x, w, cos, sin))
    assert torch.autograd.gradcheck(lambda a: dtk.rms_norm_rope(a), (x,))
    wa = torch.randn(H * D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dtk.rms_norm_rope(*a, interleaved=interleaved, across_heads=True),
                                    (x, wa, cos, sin))
    # float32 gradients of x and weight against the reference's autograd
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    cf, sf = cos.detach().float(), sin.detach().float()
    g = torch.randn(B, S, H, D)
    got = torch.autograd.grad(dtk.rms_norm_rope(xf, wf, cf, sf, interleaved=interleaved), (xf, wf), g)
    want = torch.autograd.grad(rms_norm_rope_reference(xf, wf, cf, sf, interleaved=interleaved), (xf, wf), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck_and_compile():
    x = torch.randn(2, 6, 3, 16)
    w = torch.randn(16)
    cos, sin = _tables(6, 16)
    for args in [(x, w, cos, sin, 1e-6, True), (x, None, None, None, 1e-5, False),
                 (x.transpose(1, 2).contiguous().transpose(1, 2), w, cos, sin, 1e-6, False),
                 (x, torch.randn(3 * 16), cos, sin, 1e-6, True, True)]:
        torch.library.opcheck(torch.ops.dtk.rms_norm_rope.default, args)
    fn = torch.compile(lambda x: dtk.rms_norm_rope(x, w, cos, sin) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), 2 * dtk.rms_norm_rope(x, w, cos, sin))


@pytest.mark.parametrize("call,match", [
    (lambda x, w, c, s: dtk.rms_norm_rope(x[0], w, c, s), r"x must be \(B, S, H, D\)"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x.int(), w, c, s), "x must be a floating tensor"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x.transpose(2, 3), None, None, None), "contiguous last dim"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w[:-1], c, s), r"weight must be \(D=8,\)"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w, c, None), "cos and sin must be given together"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w, c[:-1], s), r"cos must be \(S=5, D=8\)"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w, c, s.int()), "sin must be a floating tensor"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x[..., :7], w[:7], None, None, eps=0.0), "eps must be a positive"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x[..., :7], w[:7], c[:, :7], s[:, :7]), "even head dim"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w.to("meta"), c, s), "weight is on meta"),
    (lambda x, w, c, s: dtk.rms_norm_rope(x, w, c, s, across_heads=True), r"weight must be \(H\*D=24,\)"),
])
def test_bad_input(call, match):
    x = torch.randn(2, 5, 3, 8)
    cos, sin = _tables(5, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, torch.randn(8), cos, sin)


@pytest.mark.parametrize("args,match", [
    (lambda x, w, c, s: (x, w, c[:-1], s, 1e-6, True), r"cos must be \(S=5, D=8\)"),
    (lambda x, w, c, s: (x, w, c, s, -1.0, True), "eps must be a positive"),
    (lambda x, w, c, s: (x[..., :7], None, c[:, :7], s[:, :7], 1e-6, True), "even head dim"),
    (lambda x, w, c, s: (x, w[:3], c, s, 1e-6, True), r"weight must be \(D=8,\)"),
    (lambda x, w, c, s: (x, w, c, s, 1e-6, True, True), r"weight must be \(H\*D=24,\)"),
])
def test_bad_input_cpu_kernel(args, match):
    """The C++ kernel checks for itself (torch.ops.dtk.rms_norm_rope called directly)."""
    x = torch.randn(2, 5, 3, 8)
    cos, sin = _tables(5, 8)
    with pytest.raises(ValueError, match=match):
        torch.ops.dtk.rms_norm_rope(*args(x, torch.randn(8), cos, sin))


def test_last_engine_on_cpu():
    dtk.rms_norm_rope(torch.randn(1, 2, 1, 8))
    assert dtk.last_engine("rms_norm_rope") == "cpp"
