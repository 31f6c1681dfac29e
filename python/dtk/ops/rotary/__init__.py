"""QK-norm + rotary embedding in one pass (`dtk.rms_norm_rope`, op `dtk::rms_norm_rope`).

FLUX (and most DiTs; Wan over all heads at once) normalise q and k with RMSNorm and then apply the rotary position
embedding before attention. Written as diffusers writes them (RMSNorm, then apply_rotary_emb) that
is about a dozen elementwise passes over q and k, several in float32: at FLUX 4096^2 (66k tokens x
3072 channels) more memory traffic per layer than the window attention's own. This op reads x once
and writes the result once.

Op schema (csrc/dtk.cpp):
  rms_norm_rope(Tensor x, Tensor? weight, Tensor? cos, Tensor? sin, float eps, bool interleaved,
                bool across_heads=False) -> Tensor

Engines (engine.py): C++ on the CPU (csrc/rotary/cpu.cpp), Triton on CUDA (triton.py, its launch
configuration chosen by engine.py); the float64 reference is reference.py. Autograd: x, weight,
cos and sin (torch-op formula, _register.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _register  # noqa: F401  (fake kernel, Triton CUDA kernel, autograd)
from . import engine
from ._register import check_rms_norm_rope

__all__ = ["rms_norm_rope"]


def rms_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
                  sin: Optional[torch.Tensor] = None, *, eps: float = 1e-6, interleaved: bool = True,
                  across_heads: bool = False) -> torch.Tensor:
    """RMS norm over the head dim, then the rotary embedding, in one pass:
    ``n = x / sqrt(mean(x^2) + eps) * weight``, ``out = n * cos + rotate(n) * sin`` where ``rotate``
    maps each pair ``(n0, n1)`` to ``(-n1, n0)``.

    Args:
        x: (B, S, H, D) floating, any strides on B/S/H (e.g. ``linear(h).unflatten(-1, (H, D))``),
            contiguous last dim. CPU: float16/bfloat16/float32/float64; GPU: float16/bfloat16/float32.
        weight: (D,) RMSNorm scale, or None.
        cos, sin: (S, D) float tables (diffusers' ``image_rotary_emb`` with ``use_real=True``), or
            both None for the norm alone. D must be even then.
        eps: added to the mean square, > 0.
        interleaved: pairs are ``(2i, 2i+1)`` (FLUX, Wan, diffusers ``use_real_unbind_dim=-1``);
            False: ``(i, i + D/2)`` (``use_real_unbind_dim=-2``).
        across_heads: the norm spans each token's H * D values (Wan's QK-norm over the whole
            projection; weight (H * D,)); the rotation stays per head.
    Returns (B, S, H, D) contiguous in x's dtype; math in float32 (float64 for float64 x), rounded
    once (diffusers rounds after the norm and again after the rotation).
    """
    check_rms_norm_rope(x, weight, cos, sin, eps, interleaved, across_heads)
    out = torch.ops.dtk.rms_norm_rope(x, weight, cos, sin, float(eps), bool(interleaved), bool(across_heads))
    engine.record_cpu(x)
    return out
