"""Sparse-token attention: several K/V sources without concatenation, sparse queries gathered and
scattered in the kernel (SpotEdit, OminiControl2, DualParal), and variable-length branches with a
group mask and bias (OminiControl).

Op schemas (csrc/dtk.cpp):
  multi_kv_attention(Tensor q, Tensor[] ks, Tensor[] vs, Tensor?[] kv_index, Tensor? q_index,
                     float? scale) -> (Tensor out, Tensor lse)
  multi_kv_attention_out(Tensor q, Tensor[] ks, Tensor[] vs, Tensor?[] kv_index, Tensor q_index,
                         float? scale, Tensor(a!) out) -> Tensor lse
  segment_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor group_mask,
                    Tensor? group_bias, float? scale) -> (Tensor out, Tensor lse)
The in-place scatter is a separate out-variant op with a mutable `out` (a custom op may not return
an alias of an input), which is what makes `torch.library.opcheck` pass on both.

CPU tensors run the C++ kernels; on CUDA, engine.py chooses cuDNN + an lse merge or Triton
(`engine=` / `dtk.config(sparse_engine=...)`; docs/architecture.md).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ... import _config
from . import _register  # noqa: F401  (fake kernels, autograd and CUDA kernels)
from .checks import check_multi_kv, check_segment
from .engine import pinned

__all__ = ["multi_kv_attention", "segment_attention", "ominicontrol_group_mask"]


def multi_kv_attention(q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], *,
                       kv_index: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       q_index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None, return_lse: bool = False, engine: Optional[str] = None):
    """Attention of q over the concatenation of K/V segments, without materialising it.

    Args:
        q: (B, S_q, H, D). ks[i], vs[i]: (B, L_i, H_kv, D), H % H_kv == 0 (GQA); segment lengths
            may differ (0 allowed). Any strides on B, S, H; contiguous last dim.
        kv_index: one entry per segment, None (all L_i keys) or an int tensor (m,) / (B, m) of key
            positions of that segment (compressed condition tokens); -1 entries are padding and
            skipped; repeated entries count as repeated keys.
        q_index: (B, n) int: compute only these query rows (gathered in the kernel); -1 = padding
            (e.g. ``dtk.mask_to_index`` output). Duplicates are allowed (same value written twice).
            An empty index (n = 0) is valid.
        out: (B, S_q, H, D), needs q_index: the rows are scattered into ``out`` in place and every
            other row is left untouched (SpotEdit keeps the previous step's values there). The
            kernel writes them itself; when autograd is recording (an input requires grad) the
            rows are computed by the differentiable op and then scattered.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp (B, H, n) float32 (natural log): partial results
            over disjoint key sets merge exactly with it.

    Returns ``out``: (B, n, H, D) with q_index (padding rows 0, lse -inf), (B, S_q, H, D)
    without, or the given ``out``; plus lse with return_lse.

        engine: the GPU engine of this call: "auto" (cuDNN where it serves the call, else Triton),
            "triton" or "cudnn" (a call it cannot serve raises ValueError saying why); None: the
            ``dtk.config(sparse_engine=...)`` setting (default "auto"). CPU tensors always run the
            C++ kernel. ``dtk.last_engine("multi_kv_attention")`` names the engine that served.

    Index values are checked on CPU tensors (IndexError); on the GPU only with
    ``dtk.config(check_indices=True)`` (the check needs a host sync), else out-of-range entries are
    treated as padding.

    Differentiable in q, ks and vs through out and lse (FlashAttention-2 backward from the saved
    lse, Triton on a GPU); rows outside q_index and keys outside kv_index get zero gradients,
    repeats add up.
    """
    with pinned(engine):
        return _multi_kv_attention(q, list(ks), list(vs), kv_index, q_index, out, scale, return_lse)


def _multi_kv_attention(q, ks, vs, kv_index, q_index, out, scale, return_lse):
    kv_index = [None] * len(ks) if kv_index is None else list(kv_index)
    s = check_multi_kv(q, ks, vs, kv_index, q_index, scale, out)
    if q.device.type == "cpu":   # the C++ kernels (the CUDA kernels' engine.py notes its own choice)
        for op in ("multi_kv_attention",) if out is None else ("multi_kv_attention", "multi_kv_attention_out"):
            _config.record_engine(op, "cpp")
    if out is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, out, *ks, *vs)):
        # differentiable path (training): the compact op, whose rows are then scattered into out
        o, lse = torch.ops.dtk.multi_kv_attention(q, ks, vs, kv_index, q_index, s)
        _scatter_rows_(out, o, q_index)
        return (out, lse) if return_lse else out
    if out is not None:
        lse = torch.ops.dtk.multi_kv_attention_out(q, ks, vs, kv_index, q_index, s, out)
        return (out, lse) if return_lse else out
    o, lse = torch.ops.dtk.multi_kv_attention(q, ks, vs, kv_index, q_index, s)
    return (o, lse) if return_lse else o


def _scatter_rows_(out, rows, index):
    """out[b, index[b, j]] = rows[b, j] in place, with autograd; -1 / out-of-range entries skipped
    (sent to a scratch row), no host sync."""
    B, S, H, D = out.shape
    idx = index.long()
    idx = torch.where((idx >= 0) & (idx < S), idx, S)[:, :, None, None].expand(-1, -1, H, D)
    full = torch.cat([out, out.new_zeros(B, 1, H, D)], 1).scatter(1, idx, rows)
    out.copy_(full[:, :S])


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: Union[torch.Tensor, Sequence[int]],
                      group_mask: Union[torch.Tensor, Sequence[Sequence[bool]]],
                      group_bias: Optional[Union[torch.Tensor, Sequence[Sequence[float]]]] = None, *,
                      scale: Optional[float] = None, return_lse: bool = False, engine: Optional[str] = None):
    """Attention over a sequence made of G branches (text, noisy image, condition_1..n, ...).

    Args:
        q: (B, S, H, D); k, v: (B, S, H_kv, D).
        cu_seqlens: int32 (G+1,) branch offsets, 0 = cu[0] <= ... <= cu[G] = S (branches may be
            empty); a list of ints is converted.
        group_mask: (G, G) bool: query branch a sees key branch b iff group_mask[a, b]. Whole
            masked branch pairs are skipped, not computed.
        group_bias: optional (G, G) float added to the scores of (a, b) (e.g. log gamma).
        return_lse: also return lse (B, H, S) float32. A row that sees nothing gets 0 and -inf.
        engine: the GPU engine of this call: "auto" (cuDNN where it serves the call: MHA fp16/bf16,
            D % 8 == 0, D <= 128 and the branch layout on the CPU; else Triton), "triton" or
            "cudnn" (a call it cannot serve raises ValueError saying why); None: the
            ``dtk.config(sparse_engine=...)`` setting (default "auto"). CPU tensors always run the
            C++ kernel. ``dtk.last_engine("segment_attention")`` names the engine that served.

    Differentiable in q, k and v through out and lse (Triton backward on a GPU); group_bias is a
    constant (no gradient).
    """
    with pinned(engine):
        return _segment_attention(q, k, v, cu_seqlens, group_mask, group_bias, scale, return_lse)


def _segment_attention(q, k, v, cu_seqlens, group_mask, group_bias, scale, return_lse):
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int32, device=q.device)
    if not isinstance(group_mask, torch.Tensor):
        group_mask = torch.tensor(group_mask, dtype=torch.bool, device=q.device)
    if group_bias is not None and not isinstance(group_bias, torch.Tensor):
        group_bias = torch.tensor(group_bias, dtype=torch.float32, device=q.device)
    s = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
    if q.device.type == "cpu":
        _config.record_engine("segment_attention", "cpp")
    o, lse = torch.ops.dtk.segment_attention(q, k, v, cu_seqlens, group_mask, group_bias, s)
    return (o, lse) if return_lse else o


def ominicontrol_group_mask(num_conditions: int, *, device=None) -> torch.Tensor:
    """OminiControl's asymmetric G x G mask for branches [text, image, cond_1..n]: text and image
    see everything, each condition sees only itself (so its K/V can be cached across steps)."""
    G = 2 + num_conditions
    m = torch.zeros(G, G, dtype=torch.bool, device=device)
    m[:2] = True
    idx = torch.arange(2, G, device=device)
    m[idx, idx] = True
    return m
