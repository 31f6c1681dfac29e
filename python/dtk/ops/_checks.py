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
