"""Python-side registrations of dtk::window_attention: argument checks shared by the fake and the
Triton (CUDA) kernel. The CPU kernel is C++ (csrc/window/cpu.cpp) with the same checks."""
from __future__ import annotations

import torch

from .._checks import check_bshd, check_gpu, check_kv_like_q, check_scale
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


@torch.library.register_kernel("dtk::window_attention", "cuda")
def _cuda(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v):
    spec, scale = check_inputs(q, k, v, grid, window, radius, border, num_prefix, tile, scale, extra_k, extra_v)
    from .triton import window_attention_triton  # Triton compiles lazily, only where CUDA runs
    return window_attention_triton(q, k, v, spec, scale, extra_k, extra_v)
