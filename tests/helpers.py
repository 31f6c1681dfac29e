"""Shared test helpers: the tolerance rule of DESIGN §6 and layout helpers."""
import torch


def max_err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item() if a.numel() else 0.0


def assert_matches_reference(out, ref64, ref_lowp, *, atol=1e-5, name="out"):
    """FlashAttention's rule: the kernel's error against the float64 reference is at most twice
    the error of the reference evaluated in the kernel's dtype, plus atol. NaN anywhere fails."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten rows?)"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def bshd(B, S, H, D, dtype, device="cpu", transposed=False):
    """A (B,S,H,D) tensor; transposed=True gives an SDPA-layout (B,H,S,D) tensor seen as BSHD."""
    if transposed:
        return torch.randn(B, H, S, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(B, S, H, D, dtype=dtype, device=device)
