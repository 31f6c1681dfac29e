"""Python-side registrations of dtk::window_attention and its backward: argument checks shared by
the fake and the CUDA kernels, the CUDA kernels (served by the engine engine.py chooses; Triton is
imported only where CUDA runs and only where it is installed), and the autograd formula. The CPU
kernels are C++ (csrc/window/) with the same checks."""
from __future__ import annotations

import importlib.util

import torch

from ... import _config
from .._checks import check_bshd, check_gpu, check_grads, check_kv_like_q, check_scale
from .spec import make_spec


def check_inputs(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v):
    """Validates everything; returns (spec, scale). Errors name the argument at fault."""
    spec = make_spec(tuple(grid), None if window is None else tuple(window), radius, border, num_prefix,
                     None if tile is None else tuple(tile))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_bshd(t, q, name)
    B, S, H, D = q.shape
    if S != spec.seq_len:
        raise ValueError(f"grid {tuple(grid)} with num_prefix={num_prefix} needs S = {spec.seq_len} tokens, "
                         f"but q has S = {S}")
    check_kv_like_q(q, k, v)
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together")
    if extra_k is not None:
        for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
            check_bshd(t, q, name)
            if t.shape[0] != B or t.shape[2] != k.shape[2] or t.shape[3] != D:
                raise ValueError(f"{name} must be (B={B}, E, H_kv={k.shape[2]}, D={D}), got {tuple(t.shape)}")
        if extra_k.shape[1] != extra_v.shape[1]:
            raise ValueError("extra_k and extra_v must have the same number of tokens")
    check_gpu(q)
    return spec, check_scale(scale, D)


@torch.library.register_fake("dtk::window_attention")
def _fake(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v):
    check_inputs(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v)
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=torch.float32)


def _cuda(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v):
    spec, scale = check_inputs(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v)
    from .engine import window_attention_triton  # Triton compiles lazily, only where CUDA runs
    return window_attention_triton(q, k, v, spec, scale, extra_k, extra_v)


def check_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, grid, window, radius, border, num_prefix, tile,
                          scale, extra_k, extra_v):
    """check_inputs, and the saved outputs and gradients match q (out, grad_out (B, S, H, D), lse,
    grad_lse (B, H, S) float32); returns (spec, scale)."""
    res = check_inputs(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v)
    check_grads(grad_out, grad_lse, out, lse, q)
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    return res


@torch.library.register_fake("dtk::window_attention_backward")
def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, grid, window, radius, border, num_prefix, tile, scale,
                   extra_k, extra_v):
    check_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, grid, window, radius, border, num_prefix, tile,
                          scale, extra_k, extra_v)
    B, _, Hkv, D = k.shape
    E = 0 if extra_k is None else extra_k.shape[1]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), k.new_empty(B, E, Hkv, D),
            v.new_empty(B, E, Hkv, D))


def _backward_cuda(grad_out, grad_lse, q, k, v, out, lse, grid, window, radius, border, num_prefix, tile, scale,
                   extra_k, extra_v):
    spec, scale = check_backward_inputs(grad_out, grad_lse, q, k, v, out, lse, grid, window, radius, border,
                                        num_prefix, tile, scale, extra_k, extra_v)
    from .engine import window_attention_backward_triton
    return window_attention_backward_triton(grad_out, grad_lse, q, k, v, out, lse, spec, scale, extra_k, extra_v)


if importlib.util.find_spec("triton") is not None:
    torch.library.register_kernel("dtk::window_attention", "cuda")(_cuda)
    torch.library.register_kernel("dtk::window_attention_backward", "cuda")(_backward_cuda)


def _setup_context(ctx, inputs, output):
    q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, extra_k, extra_v)
    ctx.args = (grid, window, radius, border, num_prefix, tile, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, extra_k, extra_v = ctx.saved_tensors
    if not q.is_cuda:   # the C++ kernel, dispatched by torch
        _config.record_engine("window_attention_backward", "cpp")
    dq, dk, dv, dek, dev = torch.ops.dtk.window_attention_backward(
        grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out, grad_lse, q, k, v, out, lse, *ctx.args,
        extra_k, extra_v)
    has_extra = extra_k is not None
    return (dq, dk, dv, None, None, None, None, None, None, None, dek if has_extra else None,
            dev if has_extra else None)


torch.library.register_autograd("dtk::window_attention", _backward, setup_context=_setup_context)
