"""Token layout: move the grid tokens of a sequence between row-major and tile order.

Window attention is fastest when each query block is a compact 2D/3D tile of the grid, so models
permute their tokens into tile order once (e.g. after patch embedding) and back once at the end.
Tile order: tiles row-major over the tile grid, tokens row-major inside a tile; edge tiles may be
partial, so any grid and tile work. It matches `dtk.ops.window.spec.tile_permutation`.
"""
from __future__ import annotations

import functools
import math

import torch

from ..window.spec import IntOrTuple

__all__ = ["to_tile_order", "from_tile_order"]


def _as_list(name: str, value: IntOrTuple, ndim: int) -> list:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
    if isinstance(value, int):
        return [value] * ndim
    value = list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
    return value


def _args(grid: IntOrTuple, tile: IntOrTuple):
    g = _as_list("grid", grid, 1)
    return g, _as_list("tile", tile, len(g))


def to_tile_order(x: torch.Tensor, grid: IntOrTuple, tile: IntOrTuple, *, num_prefix: int = 0) -> torch.Tensor:
    """Returns a new tensor with the grid tokens of ``x`` moved from row-major to tile order.

    Args:
        x: ``(B, S, ...)`` with ``S = num_prefix + prod(grid)``; any dtype and trailing dims.
        grid: grid sizes ``(L,)``, ``(H, W)`` or ``(T, H, W)`` (an int means a 1D grid).
        tile: tile sizes, one per grid axis (an int applies to every axis); clipped to the grid.
        num_prefix: leading non-grid tokens (e.g. text), copied unchanged.

    Equivalent to ``x[:, P + perm]`` on the grid tokens, with
    ``perm, _ = dtk.ops.window.spec.tile_permutation(grid, tile)``.
    """
    g, t = _args(grid, tile)
    return torch.ops.dtk.tile_reorder(x, g, t, num_prefix, False)


def from_tile_order(x: torch.Tensor, grid: IntOrTuple, tile: IntOrTuple, *, num_prefix: int = 0) -> torch.Tensor:
    """Inverse of :func:`to_tile_order`: grid tokens of ``x`` from tile order back to row-major."""
    g, t = _args(grid, tile)
    return torch.ops.dtk.tile_reorder(x, g, t, num_prefix, True)


def _check_args(x, grid, tile, num_prefix):
    torch._check(x.dim() >= 2, lambda: f"x must have at least 2 dims (batch, seq, ...), got shape {tuple(x.shape)}")
    torch._check(1 <= len(grid) <= 3, lambda: f"grid must be 1, 2 or 3 ints, got {list(grid)}")
    torch._check(len(tile) == len(grid), lambda: f"tile must have one size per grid axis, got tile={list(tile)}")
    torch._check(num_prefix >= 0, lambda: f"num_prefix must be >= 0, got {num_prefix}")
    torch._check(x.shape[1] == num_prefix + math.prod(grid),
                 lambda: f"grid={list(grid)} does not match S (x.shape[1]) = {x.shape[1]} with num_prefix={num_prefix}")


@torch.library.register_fake("dtk::tile_reorder")
def _tile_reorder_fake(x, grid, tile, num_prefix, inverse):
    _check_args(x, grid, tile, num_prefix)
    return x.new_empty(x.shape)


@functools.lru_cache(maxsize=64)
def _gather_index(grid: tuple, tile: tuple, inverse: bool, device: torch.device) -> torch.Tensor:
    from ..window.spec import tile_permutation
    perm, inv = tile_permutation(grid, tile, device=device)
    return inv if inverse else perm


def tile_reorder_torch(x, grid, tile, num_prefix, inverse):
    """dtk::tile_reorder in plain torch ops (any device): the CUDA kernel of a build without the
    CUDA C++ sources (registered below), so a CPU-only wheel still serves CUDA tensors."""
    _check_args(x, grid, tile, num_prefix)
    torch._check(all(n >= 1 for n in grid), lambda: f"grid sizes must be >= 1, got grid={list(grid)}")
    torch._check(all(t >= 1 for t in tile), lambda: f"tile sizes must be >= 1, got tile={list(tile)}")
    idx = _gather_index(tuple(grid), tuple(tile), bool(inverse), x.device)
    P = num_prefix
    return torch.cat([x[:, :P], x[:, P:].index_select(1, idx)], 1).contiguous()


def _register_cuda_fallback():
    from ... import _C
    if not getattr(_C, "with_cuda", 0):   # the C++ CUDA kernel (csrc/layout/cuda_ops.cpp) was not compiled
        torch.library.register_kernel("dtk::tile_reorder", "cuda", tile_reorder_torch)


_register_cuda_fallback()
