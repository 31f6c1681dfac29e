"""Argument checks shared by the attention op families (Python side: wrappers, fake kernels and
Triton kernels). Every error names the argument at fault and what was expected."""
from __future__ import annotations

import math

import torch

from .. import _config

SUPPORTED_GPU_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def check_bshd(t, q, name):
    """t is a (B, S, H, D) floating tensor with q's dtype and device and a contiguous last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got stride {t.stride(-1)}")
    if t.shape[2] < 1 or t.shape[3] < 1:
        raise ValueError(f"{name} must have at least one head and a head dim D >= 1, got shape {tuple(t.shape)}")


def check_kv_like_q(q, k, v):
    """k and v: the same shape (B, S, H_kv, D) as q's batch, length and head dim, H % H_kv == 0."""
    B, S, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, S={S}, H_kv, D={D}), got {tuple(k.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[2]})")


def check_scale(scale, D):
    """The softmax scale: 1/sqrt(D) by default, else a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(max(D, 1))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__} {scale!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


def check_gpu(q):
    """The Triton engines take fp16/bf16 and head dims up to MAX_HEAD_DIM."""
    if q.device.type == "cuda":
        if q.dtype not in SUPPORTED_GPU_DTYPES:
            raise TypeError(f"q dtype {q.dtype} unsupported on GPU: use float16 or bfloat16")
        if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"head dim D={q.shape[-1]} unsupported on GPU (1..{MAX_HEAD_DIM})")


def check_grads(grad_out, grad_lse, out, lse, q):
    """The backward's saved outputs and gradients: out and grad_out (B, n, H, D) with q's dtype,
    device and a contiguous last dim, the same shape; lse and grad_lse (B, H, n) float32."""
    check_bshd(out, q, "out")
    check_bshd(grad_out, q, "grad_out")
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out must have out's shape {tuple(out.shape)}, got {tuple(grad_out.shape)}")
    B, n, H, _ = out.shape
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if tuple(t.shape) != (B, H, n) or t.device != q.device:
            raise ValueError(f"{name} must be ({B}, {H}, {n}) on {q.device}, got {tuple(t.shape)} on {t.device}")


def readable(t: torch.Tensor) -> bool:
    """True when the checks may read t's values: outside tracing, not fake, on the CPU (no device
    sync) or, with DTK_CHECK_INDICES=1, on a GPU too."""
    if t.device.type != "cpu" and not (t.device.type == "cuda" and _config.get("check_indices")):
        return False
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)


# ---------------------------------------------------------------- the linear-attention families
# (ops/linear, ops/memo): every message starts with the op ("dtk.linear_attention: ...").

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, t, op: str, dims: int = 4, layout: str = "(B, S, H, D)"):
    """t is a tensor of `dims` dimensions (`layout` names them in the message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def check_floating(name: str, t, op: str, dtype=None):
    """t is float16/bfloat16/float32/float64, and `dtype` (q's) when given."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (like q), got {t.dtype}")


def check_state_dtype(name: str, t, op: str):
    """An accumulated state: float32 (float64 for float64 inputs)."""
    if t.dtype not in STATE_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


def check_device(name: str, t, device, op: str):
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (like q), got {t.device}")


def check_positive(name: str, value, op: str):
    """A number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: {name} must be a number > 0, got {value!r}")


def check_unit_interval(name: str, value, op: str):
    """A number in [0, 1]."""
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {value!r}")


def check_cu_seqlens(cu_seqlens, total: int, device, op: str, batch: int, name: str = "cu_seqlens",
                     values: bool = True):
    """A FlashAttention packing: int32 (num_seqs + 1,) on `device`, inputs packed (1, total, ., .);
    with `values` (and outside tracing, not a fake tensor) also its entries: 0 first, non-decreasing,
    `total` last (a host sync on a GPU)."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: {name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"{op}: with {name} the inputs must be packed as (1, total, H, D), got batch {batch}")
    if values and not torch.compiler.is_compiling():
        from torch._subclasses.fake_tensor import is_fake
        if is_fake(cu_seqlens):
            return cu_seqlens
        c = cu_seqlens.tolist()
        if c[0] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {c[0]}")
        for i in range(1, len(c)):
            if c[i] < c[i - 1]:
                raise ValueError(f"{op}: {name} must be non-decreasing, got {c[i - 1]} then {c[i]} at index {i}")
        if c[-1] != total:
            raise ValueError(f"{op}: {name} must end at the packed length {total}, got {c[-1]}")
    return cu_seqlens


def check_kv_pair(k, v, op: str, seq: str = "sequence length"):
    """k and v: (B, S, H, D) floating tensors, same dtype and device, matching in B, S (`seq`) and H."""
    check_tensor("k", k, op)
    check_tensor("v", v, op)
    check_floating("k", k, op)
    check_floating("v", v, op, k.dtype)
    check_device("v", v, k.device, op)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must match k in batch, {seq} and heads, got v {tuple(v.shape)}, k {tuple(k.shape)}")


def check_qkv_heads(q, k, v, op: str, same_heads: bool = False):
    """q (B, S_q, H, D), k (B, S_k, H_kv, D), v (B, S_k, H_kv, D_v): floating, q's dtype and device;
    H a multiple of H_kv (GQA), or equal with `same_heads`. Any strides."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, op)
    check_floating("q", q, op)
    check_floating("k", k, op, q.dtype)
    check_floating("v", v, op, q.dtype)
    check_device("k", k, q.device, op)
    check_device("v", v, q.device, op)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q, k and v must have the same batch size, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k must have q's head dim {q.shape[3]}, got k {tuple(k.shape)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: v must match k in sequence length and heads, got v {tuple(v.shape)}, "
                         f"k {tuple(k.shape)}")
    if same_heads:
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"{op}: k and v must have q's number of heads {q.shape[2]}, got {k.shape[2]}")
    elif k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{op}: the heads of q ({q.shape[2]}) must be a multiple of the heads of k ({k.shape[2]})")


def check_triton_float(op: str, tensors, head_dims: dict, max_head_dim: int = MAX_HEAD_DIM):
    """What the linear families' Triton kernels take: no float64 (they accumulate in float32, so
    float64 inputs would silently lose precision and get float32 states), and head dims
    (`head_dims`: argument name -> head dim) up to `max_head_dim` (their tiles span the padded head
    dim; larger ones do not fit in registers and shared memory)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"{op}: float64 is CPU-only (the GPU kernels accumulate in float32); use float16, "
                            "bfloat16 or float32 on CUDA")
    for name, d in head_dims.items():
        if d > max_head_dim:
            raise ValueError(f"{op}: the GPU kernels take head dims up to {max_head_dim}, got {name} head dim "
                             f"{d} (CPU tensors take any)")
