"""Window attention: local windows (CLEAR's circle, clipped borders) and inward sliding windows
(NATTEN / FreeSwim) over a 1D/2D/3D token grid that follows `num_prefix` global tokens."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _config
from .._checks import check_scale
from . import _register  # noqa: F401  (fake kernel and Triton CUDA kernel of dtk::window_attention)
from ..layout import IntOrTuple, as_tuple, suggest_tile, tile_permutation  # noqa: F401  (window re-exports both)
from .pool import pool_grid_tokens  # noqa: F401


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: IntOrTuple,
                     window: Optional[IntOrTuple] = None, *, radius: Optional[int] = None,
                     border: str = "inward", num_prefix: int = 0, tile: Optional[IntOrTuple] = None,
                     scale: Optional[float] = None, extra_k: Optional[torch.Tensor] = None,
                     extra_v: Optional[torch.Tensor] = None, return_lse: bool = False,
                     engine: Optional[str] = None):
    """Attention where each grid query sees a window of the token grid.

    Args:
        q: (B, S, H, D); k, v: (B, S, H_kv, D) with H % H_kv == 0 (GQA). Any strides on B, S, H
            (an SDPA-layout tensor passes as ``x.transpose(1, 2)`` without a copy); the last dim
            must be contiguous. S = num_prefix + prod(grid).
        grid: (L,), (H, W) or (T, H, W): the token grid after the prefix.
        window: box size, one int or one per axis; -1 = the whole axis. With ``border="inward"``
            (NATTEN / FreeSwim) a query at p on an axis of length N sees [s, s + w - 1] with
            s = max(0, min(p - w//2, N - w)) (constant size, shifted inside); with ``"clip"`` it
            sees [p - w//2, p + w - 1 - w//2] clipped to the axis.
        radius: circle window instead of a box (CLEAR): keys with sum over axes of
            (k_a - c_a)^2 < radius^2; c = p under "clip", c = max(r-1, min(p, N-r)) under
            "inward". Exactly one of window / radius.
        num_prefix: global tokens (text) before the grid: they attend to and are attended by all.
        tile: grid tokens are stored in tile order with this tile (see ``dtk.tile_permutation``);
            None means row-major.
        scale: softmax scale, default 1/sqrt(D).
        extra_k, extra_v: (B, E, H_kv, D) extra keys seen by the grid queries only (CLEAR's pooled
            tokens).
        return_lse: also return the log-sum-exp (B, H, S) float32 (natural log).
        engine: the GPU engine of this call: None or "auto" (the ``window_engine`` setting of
            ``dtk.config``, by default the main Triton engine), "triton" (the main engine) or
            "triton-single-loop" (the warp-specialized single-loop forward, Hopper; a problem it
            cannot take is a ValueError that says why: extra keys, edge tiles, ...). CPU tensors
            are always served by the C++ engine. ``dtk.last_engine("window_attention")`` names
            the engine that served the latest call.

    A query that sees no key at all (possible for inward circles on grids smaller than the
    circle) gets a zero output and lse = -inf (and zero gradients).

    Differentiable in q, k, v, extra_k and extra_v, through out and lse (FlashAttention-2
    backward from the saved lse: C++ on the CPU, Triton dq and dk/dv passes on the GPU).
    """
    for name, value in (("radius", radius), ("num_prefix", num_prefix)):
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    grid = as_tuple("grid", grid, None)
    window = None if window is None else as_tuple("window", window, len(grid))
    tile = None if tile is None else as_tuple("tile", tile, len(grid))
    if engine is not None and engine not in _ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, (None,) + _ENGINES))}, got {engine!r}")
    args = (q, k, v, list(grid), None if window is None else list(window), radius, border, num_prefix,
            None if tile is None else list(tile), None if scale is None else check_scale(scale, 1), extra_k, extra_v)
    if engine is None:
        out, lse = torch.ops.dtk.window_attention(*args)
    else:
        with _config.config(window_engine=engine):
            out, lse = torch.ops.dtk.window_attention(*args)
    if not q.is_cuda:   # the C++ kernel, dispatched by torch
        _config.record_engine("window_attention", "cpp")
    return (out, lse) if return_lse else out


_ENGINES = _config.OPTIONS["window_engine"].choices
