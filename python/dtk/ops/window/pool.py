"""Pooled grid tokens: CLEAR's "downsample" keys/values.

CLEAR adds to every image query's local window the image keys/values average-pooled over df x df
patches of the token grid with learnable per-position weights (initialised to 1/df^2). The pooled
tokens are passed to :func:`dtk.window_attention` as ``extra_k`` / ``extra_v`` (seen by grid
queries only). Plain PyTorch (differentiable in ``x`` and ``weight``, so the pooling weights
train); cost O(S * D), negligible next to the attention.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch

from ..layout import IntOrTuple, tile_permutation

__all__ = ["pool_grid_tokens"]


def pool_grid_tokens(x: torch.Tensor, grid: Sequence[int], factor: IntOrTuple,
                     weight: Optional[torch.Tensor] = None, *, num_prefix: int = 0,
                     tile: Optional[IntOrTuple] = None) -> torch.Tensor:
    """Weighted pooling of the grid tokens of ``x`` over non-overlapping patches.

    Args:
        x: ``(B, S, ...)`` with ``S = num_prefix + prod(grid)`` (typically ``(B, S, H, D)`` keys or
            values); the first ``num_prefix`` tokens are not part of the grid and are ignored.
        grid: ``(H, W)`` (or any 1-3 axes) of the token grid.
        factor: patch size per axis (an int applies to every axis).
        weight: per-position weights of the patch, any shape with ``prod(factor)`` elements in
            row-major patch order (CLEAR stores them as ``(1, 1, 1, df, 1, df, 1)``); ``None`` means
            a plain mean (``1 / prod(factor)``).
        num_prefix: leading non-grid tokens.
        tile: the grid tokens of ``x`` are in tile order with this tile (see
            :func:`dtk.tile_permutation`); pooling uses their grid positions.

    Returns ``(B, prod(grid // factor), ...)``: patch ``p`` (row-major over the patch grid) is
    ``sum_j weight[j] * x[token j of patch p]``. Axes that ``factor`` does not divide are cropped
    at the end (CLEAR requires divisible grids; cropping keeps any resolution usable); an axis
    shorter than its factor gives an empty result.
    """
    grid = tuple(int(n) for n in grid)
    nd = len(grid)
    f = (factor,) * nd if isinstance(factor, int) else tuple(int(v) for v in factor)
    if len(f) != nd or any(v < 1 for v in f):
        raise ValueError(f"factor must be an int >= 1 or one per grid axis {grid}, got {factor!r}")
    P = int(num_prefix)
    if x.dim() < 2 or x.shape[1] != P + _prod(grid):
        raise ValueError(f"x must be (B, S, ...) with S = num_prefix + prod(grid) = {P + _prod(grid)}, "
                         f"got shape {tuple(x.shape)}")
    n = _prod(f)
    if weight is None:
        w = x.new_full((n,), 1.0 / n)
    else:
        if weight.numel() != n:
            raise ValueError(f"weight must have prod(factor) = {n} elements, got shape {tuple(weight.shape)}")
        w = weight.reshape(n).to(x.dtype)
    B, rest = x.shape[0], x.shape[2:]
    tile = (tile,) * nd if isinstance(tile, int) else (None if tile is None else tuple(int(v) for v in tile))
    idx = _patch_index(grid, f, tile, x.device)
    g = x[:, P:].index_select(1, idx.flatten()).reshape((B,) + tuple(idx.shape) + tuple(rest))
    w = w.reshape((1, 1, n) + (1,) * len(rest))
    return (g * w).sum(dim=2)


@lru_cache(maxsize=32)
def _patch_index(grid, factor, tile, device) -> torch.Tensor:
    """(patches, prod(factor)): the memory position (after the prefix) of token j of patch p, patches
    row-major over the cropped patch grid; one gather then replaces a tile-order permutation and
    a patch-major copy per call (the index is built once per geometry)."""
    nd = len(grid)
    out_grid = tuple(a // b for a, b in zip(grid, factor))
    rm = torch.arange(_prod(grid), device=device).reshape(grid)
    rm = rm[tuple(slice(0, o * b) for o, b in zip(out_grid, factor))]
    shape = []
    for o, b in zip(out_grid, factor):
        shape += [o, b]
    rm = rm.reshape(shape).permute([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])
    rm = rm.reshape(_prod(out_grid), _prod(factor))
    if tile is not None:
        rm = tile_permutation(grid, tile, device=device)[1][rm]    # row-major -> tile-order position
    return rm


def _prod(t):
    out = 1
    for v in t:
        out *= v
    return out
