"""The argument checks of the sparse-token ops, one set per op, shared by the wrappers
(ops/sparse/__init__.py), the fake (meta) kernels and the CUDA kernels (_register.py); the C++ CPU
kernels (csrc/sparse/cpu.cpp) run the same checks with the same exception types. Every error names
the argument at fault and what was expected. Index *values* are checked only for CPU tensors (a
check on the GPU would need a host sync, `dtk.config(check_indices=True)`); on the GPU an
out-of-range entry is treated like padding (-1)."""
from __future__ import annotations

import torch

from .._checks import check_bshd, check_gpu, check_grads, check_kv_like_q, check_scale, readable

_INT = (torch.int32, torch.int64)


def _check_index(idx, name, q, limit, shapes):
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor, got {type(idx).__name__}")
    if idx.dtype not in _INT:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {idx.dtype}")
    if idx.device != q.device:
        raise ValueError(f"{name} is on {idx.device}, expected q's device {q.device}")
    if tuple(idx.shape[:-1]) not in shapes and not (idx.dim() == 1 and () in shapes):
        raise ValueError(f"{name} has shape {tuple(idx.shape)}; expected {' or '.join(_fmt(s) for s in shapes)}")
    if idx.numel() and readable(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= limit:
            raise IndexError(f"{name} out of range: entries must be in [0, {limit}) or -1 (padding), "
                             f"got values in [{lo}, {hi}]")


def _fmt(batch):
    return "(m,)" if batch == () else f"({batch[0]}, m)"


def check_multi_kv(q, ks, vs, kv_index, q_index, scale, out=None):
    """Validates dtk.multi_kv_attention's arguments; returns the scale. Errors name the argument."""
    check_bshd(q, q, "q")
    B, SQ, H, D = q.shape
    ks, vs = list(ks), list(vs)
    if len(ks) != len(vs):
        raise ValueError(f"ks and vs must have the same number of segments, got {len(ks)} and {len(vs)}")
    if not ks:
        raise ValueError("ks must hold at least one K/V segment")
    Hkv = ks[0].shape[2] if isinstance(ks[0], torch.Tensor) and ks[0].dim() == 4 else None
    for i, (k, v) in enumerate(zip(ks, vs)):
        check_bshd(k, q, f"ks[{i}]")
        check_bshd(v, q, f"vs[{i}]")
        if k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D:
            raise ValueError(f"ks[{i}] must be (B={B}, L, H_kv={Hkv}, D={D}), got {tuple(k.shape)} "
                             "(mismatched segments)")
        if v.shape != k.shape:
            raise ValueError(f"vs[{i}] must have the shape of ks[{i}] {tuple(k.shape)}, got {tuple(v.shape)} "
                             "(mismatched segments)")
    if H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if kv_index is not None and len(kv_index) not in (0, len(ks)):
        raise ValueError(f"kv_index must hold one entry (tensor or None) per segment ({len(ks)}), got {len(kv_index)}")
    for i, idx in enumerate(kv_index or []):
        if idx is not None:
            if not isinstance(idx, torch.Tensor):
                raise TypeError(f"kv_index[{i}] must be an integer tensor or None, got {type(idx).__name__}")
            if idx.dim() not in (1, 2):
                raise ValueError(f"kv_index[{i}] must be (m,) or (B={B}, m), got shape {tuple(idx.shape)}")
            _check_index(idx, f"kv_index[{i}]", q, ks[i].shape[1], [(), (B,)])
    if q_index is not None:
        if not isinstance(q_index, torch.Tensor):
            raise TypeError(f"q_index must be an integer tensor (B={B}, n), got {type(q_index).__name__}")
        if q_index.dim() != 2:
            raise ValueError(f"q_index must be (B={B}, n), got shape {tuple(q_index.shape)}")
        _check_index(q_index, "q_index", q, SQ, [(B,)])
    if out is not None:
        if q_index is None:
            raise ValueError("out needs q_index (the rows to scatter into)")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if out.dtype != q.dtype or out.device != q.device:
            raise TypeError(f"out must match q's dtype {q.dtype} and device {q.device}, got {out.dtype} on {out.device}")
    check_gpu(q)
    return check_scale(scale, D)


def check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    """Validates dtk.segment_attention's arguments; returns the scale."""
    check_bshd(q, q, "q")
    check_bshd(k, q, "k")
    check_bshd(v, q, "v")
    B, S, H, D = q.shape
    check_kv_like_q(q, k, v)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor with G+1 >= 2 entries")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    G = cu_seqlens.numel() - 1
    if not isinstance(group_mask, torch.Tensor) or group_mask.dtype != torch.bool:
        raise TypeError(f"group_mask must be a bool tensor, got "
                        f"{group_mask.dtype if isinstance(group_mask, torch.Tensor) else type(group_mask).__name__}")
    if tuple(group_mask.shape) != (G, G):
        raise ValueError(f"group_mask must be G x G = {G} x {G} (G = len(cu_seqlens) - 1), got shape "
                         f"{tuple(group_mask.shape)}")
    if group_bias is not None:
        if not group_bias.is_floating_point():
            raise TypeError(f"group_bias must be a floating tensor, got {group_bias.dtype}")
        if tuple(group_bias.shape) != (G, G):
            raise ValueError(f"group_bias must be G x G = {G} x {G}, got shape {tuple(group_bias.shape)}")
    if cu_seqlens.numel() and readable(cu_seqlens):
        c = cu_seqlens.tolist()
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != S:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at S={S}, got {c}")
    check_gpu(q)
    return check_scale(scale, D)


def check_multi_kv_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
    """check_multi_kv, and out / grad_out (B, n, H, D), lse / grad_lse (B, H, n) float32, with
    n = q_index's width (S_q without q_index); returns the scale."""
    scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale)
    check_grads(grad_out, grad_lse, out, lse, q)
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    if tuple(out.shape) != (B, n, H, D):
        raise ValueError(f"out must be (B, n, H, D) = {(B, n, H, D)} (n = q_index's width, else S_q), "
                         f"got {tuple(out.shape)}")
    return scale


def check_segment_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
    """check_segment, and out / grad_out shaped like q, lse / grad_lse (B, H, S) float32."""
    scale = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
    check_grads(grad_out, grad_lse, out, lse, q)
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    return scale
