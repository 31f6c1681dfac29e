"""Token layout: move the grid tokens of a sequence between row-major and tile order.

Window attention is fastest when each query block is a compact 2D/3D tile of the grid, so models
permute their tokens into tile order once (e.g. after patch embedding) and back once at the end.
Tile order: tiles row-major over the tile grid, tokens row-major inside a tile; edge tiles may be
partial, so any grid and tile work. It matches :func:`tile_permutation`. The tile-order geometry
(argument normalisation, the permutation, blocks of contiguous tokens, `suggest_tile`) is in
tiles.py.

Op schema (csrc/dtk.cpp):
  tile_reorder(Tensor x, int[] grid, int[] tile, int num_prefix, bool inverse) -> Tensor

Engines (engine.py): C++ on the CPU (csrc/layout/cpu.cpp), CUDA C++ on CUDA (csrc/layout/cuda.cu),
or the torch gather of reference.py when the CUDA kernel was not compiled.
"""
from __future__ import annotations

import torch

from . import _register  # noqa: F401  (fake kernel; the torch CUDA kernel when CUDA C++ was not compiled)
from . import engine
from ._register import tile_reorder_torch  # noqa: F401
from .tiles import (IntOrTuple, as_tuple, block_fill, block_geometry, block_shape, check_grid,  # noqa: F401
                    check_tile, pad3, suggest_tile, tile_order_index, tile_permutation)

__all__ = ["to_tile_order", "from_tile_order", "tile_permutation", "suggest_tile"]


def _args(grid: IntOrTuple, tile: IntOrTuple):
    g = as_tuple("grid", grid, None)
    return list(g), list(as_tuple("tile", tile, len(g)))


def to_tile_order(x: torch.Tensor, grid: IntOrTuple, tile: IntOrTuple, *, num_prefix: int = 0) -> torch.Tensor:
    """Returns a new tensor with the grid tokens of ``x`` moved from row-major to tile order.

    Args:
        x: ``(B, S, ...)`` with ``S = num_prefix + prod(grid)``; any dtype and trailing dims.
        grid: grid sizes ``(L,)``, ``(H, W)`` or ``(T, H, W)`` (an int means a 1D grid).
        tile: tile sizes, one per grid axis (an int applies to every axis); clipped to the grid.
        num_prefix: leading non-grid tokens (e.g. text), copied unchanged.

    Equivalent to ``x[:, P + perm]`` on the grid tokens, with
    ``perm, _ = dtk.tile_permutation(grid, tile)``.
    """
    g, t = _args(grid, tile)
    out = torch.ops.dtk.tile_reorder(x, g, t, num_prefix, False)
    engine.record(x)
    return out


def from_tile_order(x: torch.Tensor, grid: IntOrTuple, tile: IntOrTuple, *, num_prefix: int = 0) -> torch.Tensor:
    """Inverse of :func:`to_tile_order`: grid tokens of ``x`` from tile order back to row-major."""
    g, t = _args(grid, tile)
    out = torch.ops.dtk.tile_reorder(x, g, t, num_prefix, True)
    engine.record(x)
    return out
