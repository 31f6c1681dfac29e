"""Python-side registrations of dtk::tile_reorder: the argument checks shared by the fake kernel
and the torch kernel, the fake (meta) kernel, and the torch kernel that serves CUDA tensors when
the CUDA C++ kernel was not compiled (engine.py). The CPU and CUDA C++ kernels check the same
arguments in csrc/layout/tile_reorder.h."""
from __future__ import annotations

import math

import torch

from . import engine
from .reference import tile_reorder_reference


def check_tile_reorder(x, grid, tile, num_prefix):
    torch._check_value(x.dim() >= 2, lambda: f"x must have at least 2 dims (batch, seq, ...), got shape {tuple(x.shape)}")
    torch._check_value(1 <= len(grid) <= 3, lambda: f"grid must be 1, 2 or 3 ints, got {list(grid)}")
    torch._check_value(len(tile) == len(grid), lambda: f"tile must have one size per grid axis, got tile={list(tile)}")
    torch._check_value(num_prefix >= 0, lambda: f"num_prefix must be >= 0, got {num_prefix}")
    torch._check_value(x.shape[1] == num_prefix + math.prod(grid),
                 lambda: f"grid={list(grid)} does not match S (x.shape[1]) = {x.shape[1]} with num_prefix={num_prefix}")


@torch.library.register_fake("dtk::tile_reorder")
def _tile_reorder_fake(x, grid, tile, num_prefix, inverse):
    check_tile_reorder(x, grid, tile, num_prefix)
    return x.new_empty(x.shape)


def tile_reorder_torch(x, grid, tile, num_prefix, inverse):
    """dtk::tile_reorder in plain torch ops (any device): the CUDA kernel of a build without the
    CUDA C++ sources (registered below), so a CPU-only wheel still serves CUDA tensors."""
    check_tile_reorder(x, grid, tile, num_prefix)
    torch._check_value(all(n >= 1 for n in grid), lambda: f"grid sizes must be >= 1, got grid={list(grid)}")
    torch._check_value(all(t >= 1 for t in tile), lambda: f"tile sizes must be >= 1, got tile={list(tile)}")
    return tile_reorder_reference(x, grid, tile, num_prefix, inverse)


if not engine.can_run_cuda():
    torch.library.register_kernel("dtk::tile_reorder", "cuda", tile_reorder_torch)
