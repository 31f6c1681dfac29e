"""Reference engine for the linear-attention family: plain PyTorch, computed in the inputs' dtype
(float64 is the ground truth of the tests; a float16/bfloat16 run gives the error baseline of
docs/testing.md). No argument checking: the public wrappers in ``dtk.ops.linear`` do that.

Layouts: q ``(B, S_q, H, D)``, k ``(B, S_k, H_kv, D)``, v ``(B, S_k, H_kv, D_v)``; states are
``kv_sum (B, H_kv, D, D_v)``, ``k_sum (B, H_kv, D)``, ``count (B,)`` int64. Query head ``h`` reads
key/value head ``h // (H // H_kv)`` (the ``repeat_interleave`` convention of GQA).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu1", "relu", "identity")


def feature_map_fn(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "elu1":
        return F.elu(x) + 1
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _expand_heads(t: torch.Tensor, H: int, dim: int) -> torch.Tensor:
    return t if t.shape[dim] == H else t.repeat_interleave(H // t.shape[dim], dim=dim)


def _bounds(cu_seqlens) -> list[tuple[int, int]]:
    c = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(c[:-1], c[1:]))


def linear_attention_state_reference(k, v, feature_map: str = "elu1", cu_seqlens=None):
    """(kv_sum (B,H_kv,D,D_v), k_sum (B,H_kv,D), count (B,) int64) in k's dtype; with cu_seqlens the
    leading dimension is the number of packed sequences."""
    if cu_seqlens is not None:
        parts = [linear_attention_state_reference(k[:, s:e], v[:, s:e], feature_map) for s, e in _bounds(cu_seqlens)]
        return tuple(torch.cat([p[i] for p in parts], 0) for i in range(3))
    fk = feature_map_fn(k, feature_map)
    kv_sum = torch.einsum("bshd,bshe->bhde", fk, v)
    k_sum = fk.sum(1)
    count = torch.full((k.shape[0],), k.shape[1], dtype=torch.int64, device=k.device)
    return kv_sum, k_sum, count


def linear_attention_apply_reference(q, kv_sum, k_sum, count, feature_map: str = "elu1", normalize: bool = True,
                                     eps: float = 1e-4, scale: Optional[float] = None, cu_seqlens=None):
    """Output of linear attention for queries q against a (summed) state, in q's dtype."""
    if cu_seqlens is not None:
        outs = [linear_attention_apply_reference(q[:, s:e], kv_sum[i:i + 1], k_sum[i:i + 1], count[i:i + 1],
                                                 feature_map, normalize, eps, scale)
                for i, (s, e) in enumerate(_bounds(cu_seqlens))]
        return torch.cat(outs, 1)
    dt = q.dtype
    if scale is not None:
        q = q * scale
    fq = feature_map_fn(q, feature_map)
    H = q.shape[2]
    kv = _expand_heads(kv_sum.to(dt), H, 1)
    if not normalize:
        return torch.einsum("bshd,bhde->bshe", fq, kv)
    n = count.clamp_min(1).to(dt)
    kv = kv / n[:, None, None, None]                                   # S = (1/N) sum phi(k) v^T
    z = _expand_heads(k_sum.to(dt), H, 1) / n[:, None, None]           # mean_j phi(k_j)
    num = torch.einsum("bshd,bhde->bshe", fq, kv)
    den = torch.einsum("bshd,bhd->bsh", fq, z) + eps
    return num / den[..., None]


def linear_attention_reference(q, k, v, feature_map: str = "elu1", normalize: bool = True, eps: float = 1e-4,
                               scale: Optional[float] = None, cu_seqlens=None, cu_seqlens_k=None):
    """LinFusion's generalised linear attention (normalize=True) or plain phi(q) (sum phi(k) v^T).
    Packed: cu_seqlens packs q, cu_seqlens_k (default cu_seqlens) packs k and v; sequence i's
    queries read the state of sequence i's keys (zero, with N read as 1, when it has none)."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    kv_sum, k_sum, count = linear_attention_state_reference(k, v, feature_map, cu_k)
    return linear_attention_apply_reference(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens)


def linear_attention_quadratic_reference(q, k, v, feature_map: str = "elu1", normalize: bool = True,
                                         eps: float = 1e-4, scale: Optional[float] = None):
    """The same function through the S_q x S_k similarity matrix (an independent check of the
    factorised form above; O(S^2) memory)."""
    if scale is not None:
        q = q * scale
    H = q.shape[2]
    fq = feature_map_fn(q, feature_map)
    fk = _expand_heads(feature_map_fn(k, feature_map), H, 2)
    v = _expand_heads(v, H, 2)
    a = torch.einsum("bqhd,bkhd->bhqk", fq, fk)
    if not normalize:
        return torch.einsum("bhqk,bkhe->bqhe", a, v)
    N = max(k.shape[1], 1)
    num = torch.einsum("bhqk,bkhe->bqhe", a, v) / N
    den = a.sum(-1).transpose(1, 2) / N + eps
    return num / den[..., None]


def split_bounds(n: int, parts: int) -> Sequence[tuple[int, int]]:
    """Contiguous [start, end) shards covering range(n) (some may be empty)."""
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))
