"""Reference rms_norm_rope in plain PyTorch (float64-capable): the ground truth the C++ and Triton
kernels are tested against. The formula is diffusers' RMSNorm followed by its apply_rotary_emb
(use_real=True; interleaved pairs are `use_real_unbind_dim=-1`, halves `-2`), in one precision;
with across_heads, Wan's norm over the whole projection before its per-head rotation."""
from __future__ import annotations

import torch


def rotate(n: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotated partner of every element: (x0, x1) -> (-x1, x0) per pair."""
    if interleaved:
        a, b = n.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-b, a], -1).flatten(-2)
    a, b = n.chunk(2, -1)
    return torch.cat([-b, a], -1)


def rms_norm_rope_reference(x, weight=None, cos=None, sin=None, eps=1e-6, interleaved=True, compute_dtype=None,
                            across_heads=False):
    """(B, S, H, D) -> (B, S, H, D) in x's dtype, computed in `compute_dtype` (default: float64
    for float64 inputs, else float32). across_heads: the norm spans each token's H * D values
    (Wan), weight (H * D,)."""
    dt = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(dt)
    dims = (-2, -1) if across_heads else (-1,)
    n = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        n = n * weight.to(dt).reshape(n.shape[-2:] if across_heads else n.shape[-1:])
    if cos is not None:
        n = n * cos.to(dt)[None, :, None, :] + rotate(n, interleaved) * sin.to(dt)[None, :, None, :]
    return n.to(x.dtype)
