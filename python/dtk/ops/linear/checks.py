"""Argument checks of the linear-attention ops, one per op, shared by the public wrappers
(``__init__.py``), the fake kernels and the CUDA kernels (``_register.py`` / ``engine.py``). The
wrappers also read cu_seqlens' values (``values=True``: a host sync on a GPU); the kernels check
what needs no sync. Messages start with the op and name the argument."""
from __future__ import annotations

import torch

from .._checks import (check_cu_seqlens, check_device, check_floating, check_kv_pair, check_positive,
                       check_qkv_heads, check_state_dtype, check_tensor)
from .reference import FEATURE_MAPS


def check_feature_map(feature_map, op: str):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def check_normalize_scale(normalize, scale, op: str):
    if not isinstance(normalize, bool):
        raise TypeError(f"{op}: normalize must be a bool, got {normalize!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be None or a float, got {scale!r}")


def check_packings(q, k, cu_seqlens, cu_seqlens_k, op: str, values: bool = True):
    """cu_seqlens packs q, cu_seqlens_k (only with cu_seqlens) k and v, describing as many
    sequences; alone, cu_seqlens packs both, so q and k have the same length."""
    if cu_seqlens_k is not None:
        if cu_seqlens is None:
            raise ValueError(f"{op}: cu_seqlens_k (the packing of k and v) needs cu_seqlens (the packing of q)")
    elif cu_seqlens is not None and k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: with cu_seqlens alone q and k share the packing (pass cu_seqlens_k to pack k and v "
                         f"apart); got lengths {q.shape[1]} and {k.shape[1]}")
    check_cu_seqlens(cu_seqlens, q.shape[1], q.device, op, q.shape[0], values=values)
    check_cu_seqlens(cu_seqlens_k, k.shape[1], q.device, op, k.shape[0], "cu_seqlens_k", values=values)
    if cu_seqlens_k is not None and cu_seqlens_k.shape[0] != cu_seqlens.shape[0]:
        raise ValueError(f"{op}: cu_seqlens_k must describe as many sequences as cu_seqlens "
                         f"({cu_seqlens.shape[0] - 1}), got {cu_seqlens_k.shape[0] - 1}")


def check_linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k,
                           op: str = "dtk.linear_attention", values: bool = True):
    check_qkv_heads(q, k, v, op)
    check_feature_map(feature_map, op)
    check_positive("eps", eps, op)
    check_normalize_scale(normalize, scale, op)
    check_packings(q, k, cu_seqlens, cu_seqlens_k, op, values)


def check_linear_attention_backward(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k,
                                    values: bool = False):
    op = "dtk.linear_attention_backward"
    check_linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, op, values)
    want = tuple(q.shape[:3]) + (v.shape[3],)
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != want:
        raise ValueError(f"{op}: grad_out must have the output's shape {want}, got "
                         f"{tuple(getattr(grad_out, 'shape', ()))}")


def check_state(k, v, feature_map, cu_seqlens, op: str = "dtk.linear_attention_state", values: bool = True):
    check_kv_pair(k, v, op)
    check_feature_map(feature_map, op)
    check_cu_seqlens(cu_seqlens, k.shape[1], k.device, op, k.shape[0], values=values)


def check_apply(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens,
                op: str = "dtk.linear_attention_apply", values: bool = True):
    check_tensor("q", q, op)
    check_floating("q", q, op)
    check_tensor("kv_sum", kv_sum, op, 4, "(B, H_kv, D, D_v)")
    check_tensor("k_sum", k_sum, op, 3, "(B, H_kv, D)")
    check_tensor("count", count, op, 1, "(B,)")
    for name, t in (("kv_sum", kv_sum), ("k_sum", k_sum), ("count", count)):
        check_device(name, t, q.device, op)
    check_state_dtype("kv_sum", kv_sum, op)
    check_state_dtype("k_sum", k_sum, op)
    if count.dtype != torch.int64:
        raise TypeError(f"{op}: count must be int64, got {count.dtype}")
    n, Hkv, D = kv_sum.shape[:3]
    if D != q.shape[3]:
        raise ValueError(f"{op}: kv_sum must have q's head dim {q.shape[3]}, got {tuple(kv_sum.shape)}")
    if tuple(k_sum.shape) != (n, Hkv, D):
        raise ValueError(f"{op}: k_sum must be {(n, Hkv, D)}, got {tuple(k_sum.shape)}")
    if count.shape[0] != n:
        raise ValueError(f"{op}: count must be ({n},), got {tuple(count.shape)}")
    if Hkv == 0 or q.shape[2] % Hkv != 0:
        raise ValueError(f"{op}: the heads of q ({q.shape[2]}) must be a multiple of the state's heads ({Hkv})")
    check_feature_map(feature_map, op)
    check_positive("eps", eps, op)
    check_normalize_scale(normalize, scale, op)
    if cu_seqlens is None:
        if n != q.shape[0]:
            raise ValueError(f"{op}: the state's batch {n} must equal q's batch {q.shape[0]}")
    else:
        check_cu_seqlens(cu_seqlens, q.shape[1], q.device, op, q.shape[0], values=values)
        if cu_seqlens.shape[0] - 1 != n:
            raise ValueError(f"{op}: cu_seqlens describes {cu_seqlens.shape[0] - 1} sequences but the state has {n}")
