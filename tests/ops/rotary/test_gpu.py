"""rms_norm_rope's Triton kernel on a GPU (bf16 included, which the interpreter cannot check):
against the float64 reference, strided inputs, FLUX's shape, CUDA-graph replay."""
import pytest
import torch

import dtk
from dtk.ops.rotary.reference import rms_norm_rope_reference

from ...helpers import assert_matches_reference, graph_replay_equals_eager

pytestmark = pytest.mark.gpu


def _tables(S, D, interleaved):
    ang = torch.randn(S, D // 2, dtype=torch.float64, device="cuda") * 3
    rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat([t, t], -1))
    return rep(ang.cos()).float(), rep(ang.sin()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [40, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_reference(dtype, D, interleaved, transposed):
    B, S, H = 2, 77, 5
    x = (torch.randn(B, H, S, D, device="cuda").transpose(1, 2) if transposed
         else torch.randn(B, S, H, D, device="cuda")).to(dtype)
    w = torch.randn(D, device="cuda", dtype=dtype)
    cos, sin = _tables(S, D, interleaved)
    out = dtk.rms_norm_rope(x, w, cos, sin, interleaved=interleaved)
    ref64 = rms_norm_rope_reference(x.double(), w, cos, sin, interleaved=interleaved)
    ref_lowp = rms_norm_rope_reference(x, w, cos, sin, interleaved=interleaved, compute_dtype=dtype)
    assert_matches_reference(out, ref64, ref_lowp)


@pytest.mark.parametrize("H", [12, 40])
def test_across_heads_wan_shapes(H):
    """Wan's QK-norm over all heads (1.3B: 12 heads, 14B: 40) with its per-head rotation."""
    B, S, D = 1, 3000, 128
    qkv = torch.randn(B, S, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    x = qkv[..., H * D:2 * H * D].unflatten(-1, (H, D))
    w = torch.rand(H * D, device="cuda", dtype=torch.bfloat16) + 0.5
    cos, sin = _tables(S, D, True)
    out = dtk.rms_norm_rope(x, w, cos, sin, across_heads=True)
    ref64 = rms_norm_rope_reference(x.double(), w, cos, sin, across_heads=True)
    ref_lowp = rms_norm_rope_reference(x, w, cos, sin, compute_dtype=torch.bfloat16, across_heads=True)
    assert_matches_reference(out, ref64, ref_lowp)
    assert graph_replay_equals_eager(lambda t: dtk.rms_norm_rope(t, w, cos, sin, across_heads=True), x.contiguous())


def test_flux_shape_and_graph_replay():
    """FLUX 4096^2's q (66,048 tokens x 24 heads x 128) from a fused projection's slice, and a
    CUDA-graph replay (no host work in the launch)."""
    B, S, H, D = 1, 66048, 24, 128
    qkv = torch.randn(B, S, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    x = qkv[..., :H * D].unflatten(-1, (H, D))
    w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    cos, sin = _tables(S, D, True)
    out = dtk.rms_norm_rope(x, w, cos, sin)
    rows = torch.randint(0, S, (512,), device="cuda")
    ref64 = rms_norm_rope_reference(x[:, rows].double(), w, cos[rows], sin[rows])
    ref_lowp = rms_norm_rope_reference(x[:, rows], w, cos[rows], sin[rows], compute_dtype=torch.bfloat16)
    assert_matches_reference(out[:, rows], ref64, ref_lowp)
    assert graph_replay_equals_eager(lambda t: dtk.rms_norm_rope(t, w, cos, sin), x.contiguous())


def test_gradients_on_gpu():
    B, S, H, D = 2, 33, 3, 64
    x = torch.randn(B, S, H, D, device="cuda", requires_grad=True)
    w = torch.randn(D, device="cuda", requires_grad=True)
    cos, sin = _tables(S, D, True)
    g = torch.randn(B, S, H, D, device="cuda")
    got = torch.autograd.grad(dtk.rms_norm_rope(x, w, cos, sin), (x, w), g)
    want = torch.autograd.grad(rms_norm_rope_reference(x, w, cos, sin), (x, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autotuned_launch_is_kept(monkeypatch):
    """With autotuning on (the default outside the tests), the first call picks one of the launch
    configurations and later calls, CUDA-graph capture included, launch it directly."""
    from dtk import _tuning
    from dtk.ops.rotary import triton as rt
    monkeypatch.setenv("DTK_TRITON_AUTOTUNE", "1")
    _tuning.clear()
    B, S, H, D = 1, 4096, 24, 128
    x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    cos, sin = _tables(S, D, True)
    out = dtk.rms_norm_rope(x, w, cos, sin)
    chosen = _tuning.entries("rotary.launch")
    assert len(chosen) == 1 and next(iter(chosen.values())) in rt.launch_configs(D)
    ref64 = rms_norm_rope_reference(x.double(), w, cos, sin)
    assert_matches_reference(out, ref64, rms_norm_rope_reference(x, w, cos, sin, compute_dtype=torch.bfloat16))
    assert graph_replay_equals_eager(lambda t: dtk.rms_norm_rope(t, w, cos, sin), x)
    assert len(_tuning.entries("rotary.launch")) == 1
