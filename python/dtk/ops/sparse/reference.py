"""Reference engine of the sparse-token family: concatenates the K/V segments and builds dense
masks (float64-capable ground truth for the tests; memory O(n x total keys))."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def _attend(q, k, v, allowed, bias, scale):
    """q (B,n,H,D), k/v (B,L,Hkv,D), allowed broadcastable to (B,H,n,L) bool, bias likewise or None.
    Rows with no allowed key give 0 and lse = -inf. Computed in q's dtype."""
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def multi_kv_attention_reference(q, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], kv_index=None,
                                 q_index: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                                 out: Optional[torch.Tensor] = None):
    """Ground truth for dtk.multi_kv_attention: returns (out, lse float32). With `out` it returns a
    copy of `out` with the q_index rows replaced (the op writes in place)."""
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kv_index = [None] * len(ks) if kv_index is None else list(kv_index)
    keys, vals, valid = [], [], []
    for k, v, idx in zip(ks, vs, kv_index):
        if idx is None:
            keys.append(k)
            vals.append(v)
            valid.append(torch.ones(B, k.shape[1], dtype=torch.bool, device=q.device))
        else:
            idx = idx.long().to(q.device)
            idx = idx.expand(B, -1) if idx.dim() == 1 else idx
            if k.shape[1] == 0:  # empty segment: only padding can index it
                k = k.new_zeros(B, 1, k.shape[2], k.shape[3])
                v = v.new_zeros(B, 1, v.shape[2], v.shape[3])
            g = idx.clamp_min(0)[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
            keys.append(torch.gather(k, 1, g))
            vals.append(torch.gather(v, 1, g))
            valid.append(idx >= 0)
    k, v, valid = torch.cat(keys, 1), torch.cat(vals, 1), torch.cat(valid, 1)
    if q_index is not None:
        qi = q_index.long().to(q.device)
        q_ok = qi >= 0
        qs = torch.gather(q, 1, qi.clamp_min(0)[:, :, None, None].expand(-1, -1, H, D))
    else:
        q_ok = torch.ones(B, S, dtype=torch.bool, device=q.device)
        qs = q
    allowed = valid[:, None, None, :] & q_ok[:, None, :, None]
    o, lse = _attend(qs, k, v, allowed, None, scale)
    if out is None:
        return o, lse.float()
    res = out.clone()
    for b in range(B):
        ok = q_ok[b]
        res[b, qi[b][ok]] = o[b][ok].to(out.dtype)
    return res, lse.float()


def segment_masks(cu_seqlens, group_mask, group_bias=None, device=None):
    """(S, S) bool mask and (S, S) float bias (or None) of segment_attention, from the branch layout."""
    cu = [int(x) for x in cu_seqlens]
    G = len(cu) - 1
    lens = torch.tensor([cu[i + 1] - cu[i] for i in range(G)], device=device)
    branch = torch.repeat_interleave(torch.arange(G, device=device), lens)
    gm = torch.as_tensor(group_mask, device=device).bool()
    mask = gm[branch[:, None], branch[None, :]]
    bias = None
    if group_bias is not None:
        bias = torch.as_tensor(group_bias, device=device)[branch[:, None], branch[None, :]]
    return mask, bias


def segment_attention_reference(q, k, v, cu_seqlens, group_mask, group_bias=None, scale: Optional[float] = None):
    """Ground truth for dtk.segment_attention: dense (S, S) mask + bias. Returns (out, lse float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask, bias = segment_masks(cu_seqlens, group_mask, group_bias, q.device)
    if bias is not None:
        bias = bias.to(q.dtype)
    o, lse = _attend(q, k, v, mask, bias, scale)
    return o, lse.float()


def merge_lse(outs, lses):
    """Exact merge of partial attention results over disjoint key sets: outs (B,n,H,D), lses (B,H,n)."""
    lse = torch.logsumexp(torch.stack([l.double() for l in lses]), 0)
    safe = lse.masked_fill(torch.isinf(lse), 0)
    total = 0
    for o, l in zip(outs, lses):
        w = torch.exp(l.double() - safe).nan_to_num(0.0).transpose(1, 2)[..., None]   # (B,n,H,1)
        total = total + w * o.double()
    return total, lse
