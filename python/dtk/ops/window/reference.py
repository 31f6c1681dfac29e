"""Reference engine: dense boolean mask, any float dtype (float64 is the ground truth of the tests).
Memory is O(S^2): meant for tests and small shapes only."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .spec import WindowSpec, box_range, circle_center, grid_coords, make_spec


def window_mask(spec: WindowSpec, num_extra: int = 0, device=None) -> torch.Tensor:
    """(S, S + num_extra) bool: query i may attend key j. Extra keys follow the S sequence keys."""
    P, G = spec.num_prefix, spec.num_grid
    S = P + G
    mask = torch.zeros(S, S + num_extra, dtype=torch.bool, device=device)
    mask[:P, :S] = True          # prefix queries see every sequence key
    mask[P:, :P] = True          # every query sees the prefix keys
    mask[P:, S:] = True          # grid queries see the extra keys
    coords = grid_coords(spec, device)
    mask[P:, P:S] = grid_allowed(spec, coords, coords)
    return mask


def grid_allowed(spec: WindowSpec, q_coords, k_coords) -> torch.Tensor:
    """(n_q, n_k) bool: whether grid queries at 3D coordinates q_coords may attend grid keys at
    k_coords (each a tuple of 3 int64 tensors)."""
    allowed = torch.ones(q_coords[0].numel(), k_coords[0].numel(), dtype=torch.bool, device=q_coords[0].device)
    dist2 = torch.zeros(allowed.shape, dtype=torch.int64, device=allowed.device)
    for a in range(3):
        n, p, k = spec.grid[a], q_coords[a][:, None], k_coords[a][None, :]
        if spec.window is not None:
            lo, hi = box_range(p, n, spec.window[a], spec.border)
            allowed &= (k >= lo) & (k <= hi)
        else:
            d = k - circle_center(p, n, spec.radius, spec.border, spec.padded(a))
            dist2 += d * d
    if spec.radius is not None:
        allowed &= dist2 < spec.radius * spec.radius
    return allowed


def masked_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over allowed keys, computed in q's dtype. q (B,Sq,H,D),
    k/v (B,Sk,Hkv,D), mask (Sq,Sk). Rows with no allowed key give 0 and lse = -inf."""
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                  # (B,H,Sq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def window_attention_reference(q, k, v, grid, window=None, *, radius: Optional[int] = None,
                               border: str = "inward", num_prefix: int = 0, tile=None,
                               scale: Optional[float] = None, extra_k=None, extra_v=None):
    """Ground truth for dtk.window_attention: returns (out (B,S,H,D) in q's dtype, lse (B,H,S) float32)."""
    spec = make_spec(grid, window, radius, border, num_prefix, tile)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    E = 0
    if extra_k is not None:
        E = extra_k.shape[1]
        k, v = torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)
    mask = window_mask(spec, E, q.device)
    out, lse = masked_attention(q, k, v, mask, scale)
    return out, lse.float()
