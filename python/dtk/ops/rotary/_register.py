"""Python-side registrations of dtk::rms_norm_rope: the argument checks shared by the wrapper, the
fake and the CUDA kernels, the CUDA kernel (engine.py: Triton, registered where Triton is
installed), and the autograd formula. The CPU kernel is C++ (csrc/rotary/cpu.cpp) with the same
checks."""
from __future__ import annotations

import importlib.util
import math

import torch

from .._checks import check_bshd
from . import engine
from .reference import rotate

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_table(t, name, x):
    S, D = x.shape[1], x.shape[3]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    if tuple(t.shape) != (S, D):
        raise ValueError(f"{name} must be (S={S}, D={D}), got shape {tuple(t.shape)}")


def check_rms_norm_rope(x, weight, cos, sin, eps, interleaved, across_heads=False):
    """Validates everything; errors name the argument at fault and what was expected."""
    check_bshd(x, x, "x")
    D = x.shape[3]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
        n = x.shape[2] * D if across_heads else D
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight must be ({'H*D' if across_heads else 'D'}={n},), got shape {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device}, expected x's device {x.device}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if cos is not None:
        _check_table(cos, "cos", x)
        _check_table(sin, "sin", x)
        if D % 2:
            raise ValueError(f"the rotary embedding needs an even head dim, got D={D}")
    if x.device.type == "cuda" and x.dtype not in GPU_DTYPES:
        raise TypeError(f"x dtype {x.dtype} unsupported on GPU: use float16, bfloat16 or float32")


@torch.library.register_fake("dtk::rms_norm_rope")
def _fake(x, weight, cos, sin, eps, interleaved, across_heads=False):
    check_rms_norm_rope(x, weight, cos, sin, eps, interleaved, across_heads)
    return x.new_empty(x.shape)


def _cuda(x, weight, cos, sin, eps, interleaved, across_heads=False):
    check_rms_norm_rope(x, weight, cos, sin, eps, interleaved, across_heads)
    return engine.rms_norm_rope_cuda(x, weight, cos, sin, eps, interleaved, across_heads)


if importlib.util.find_spec("triton") is not None:
    torch.library.register_kernel("dtk::rms_norm_rope", "cuda", _cuda)


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps, interleaved, across_heads = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps, ctx.interleaved, ctx.across_heads = eps, interleaved, across_heads


def _backward(ctx, grad):
    """Gradients of x, weight, cos and sin in torch ops (recomputing the forward's norm), in
    float32 (float64 for float64 x). With a = n * weight, y = a * cos + rotate(a) * sin, and
    rotate's transpose is -rotate."""
    x, weight, cos, sin = ctx.saved_tensors
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, g = x.to(dt), grad.to(dt)
    dims = (-2, -1) if ctx.across_heads else (-1,)      # the norm's group: a head, or a token's heads
    r = torch.rsqrt(xf.square().mean(dims, keepdim=True) + ctx.eps)
    n = xf * r
    w = None if weight is None else weight.to(dt).reshape(x.shape[-2:] if ctx.across_heads else x.shape[-1:])
    a = n * w if w is not None else n
    d_cos = d_sin = None
    if cos is not None:
        c, s = cos.to(dt)[None, :, None, :], sin.to(dt)[None, :, None, :]
        if ctx.needs_input_grad[2]:
            d_cos = (g * a).sum((0, 2)).to(cos.dtype)
        if ctx.needs_input_grad[3]:
            d_sin = (g * rotate(a, ctx.interleaved)).sum((0, 2)).to(sin.dtype)
        g = g * c - rotate(g * s, ctx.interleaved)
    d_weight = None
    if weight is not None and ctx.needs_input_grad[1]:
        d_weight = (g * n).sum((0, 1) if ctx.across_heads else (0, 1, 2)).reshape(weight.shape).to(weight.dtype)
    if w is not None:
        g = g * w
    d_x = (r * (g - n * (g * n).mean(dims, keepdim=True))).to(x.dtype) if ctx.needs_input_grad[0] else None
    return d_x, d_weight, d_cos, d_sin, None, None, None


torch.library.register_autograd("dtk::rms_norm_rope", _backward, setup_context=_setup_context)
