"""Reference tile_reorder in plain PyTorch (any device and dtype: it only moves tokens): a gather
of the grid tokens by the tile-order permutation (tiles.tile_permutation)."""
from __future__ import annotations

import functools

import torch

from .tiles import tile_permutation


@functools.lru_cache(maxsize=64)
def _gather_index(grid: tuple, tile: tuple, inverse: bool, device: torch.device) -> torch.Tensor:
    perm, inv = tile_permutation(grid, tile, device=device)
    return inv if inverse else perm


def tile_reorder_reference(x: torch.Tensor, grid, tile, num_prefix: int, inverse: bool) -> torch.Tensor:
    """dtk::tile_reorder: the grid tokens of x (dim 1, after num_prefix) moved from row-major to tile
    order (inverse: back), contiguous; the prefix tokens are copied unchanged."""
    idx = _gather_index(tuple(grid), tuple(tile), bool(inverse), x.device)
    P = num_prefix
    return torch.cat([x[:, :P], x[:, P:].index_select(1, idx)], 1).contiguous()
