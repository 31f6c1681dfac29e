"""Reference engine of MEMO's memory linear attention: plain PyTorch, computed in the inputs' dtype
(float64 is the ground truth of the tests; a float16/bfloat16 run gives the error baseline of
docs/testing.md). No argument checking: the public wrappers in ``dtk.ops.memo`` do that.

Layouts: q, k, v ``(B, S, H, D)`` (B is typically pixels x batch, S the frames of a clip; heads of
q, k and v are equal); the memory is ``kv (B, H, D, D_v)``, ``z (B, H, D)``.
"""
from __future__ import annotations

import torch


def memo_features(q, k):
    """phi_q = softmax over the feature axis * D^-1/2; phi_k = softmax over the frame axis (dim 1)."""
    D = q.shape[-1]
    return torch.softmax(q, dim=-1) * D ** -0.5, torch.softmax(k, dim=1)


def memory_linear_attention_reference(q, k, v, mem_kv=None, mem_z=None, decay: float = 0.9):
    """o_i = (phi_q_i . KV) / max(phi_q_i . Z, 1e-10) with KV = decay * M_KV + sum_i phi_k_i v_i^T and
    Z = decay * M_Z + sum_i phi_k_i (plain sums without memory). Heads of q, k and v are equal."""
    fq, fk = memo_features(q, k)
    kv = torch.einsum("bshd,bshe->bhde", fk, v)
    z = fk.sum(1)
    if mem_kv is not None:
        kv = decay * mem_kv.to(kv.dtype) + kv
        z = decay * mem_z.to(z.dtype) + z
    num = torch.einsum("bshd,bhde->bshe", fq, kv)
    den = torch.einsum("bshd,bhd->bsh", fq, z).clamp_min(1e-10)
    return num / den[..., None]


def memory_update_reference(k_p, v_p, mem_kv=None, mem_z=None, decay: float = 0.9):
    """New memory after n past frames: w_j = decay^(n-1-j), KV_new = sum_j (w_j phi_k_j)(w_j v_j)^T,
    Z_new = sum_j w_j phi_k_j, M <- decay^n M + new (M = new the first time)."""
    n = k_p.shape[1]
    fk = torch.softmax(k_p, dim=1)
    w = decay ** torch.arange(n - 1, -1, -1, dtype=fk.dtype, device=fk.device)
    fkw = fk * w[None, :, None, None]
    vw = v_p * w[None, :, None, None].to(v_p.dtype)
    kv = torch.einsum("bshd,bshe->bhde", fkw, vw)
    z = fkw.sum(1)
    if mem_kv is not None:
        kv = decay ** n * mem_kv.to(kv.dtype) + kv
        z = decay ** n * mem_z.to(z.dtype) + z
    return kv, z
