"""Window geometry shared by every window-attention engine: argument normalisation and the
per-axis key ranges. Grids are padded to 3 axes with leading size-1 axes, which never restrict."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import IntOrTuple, as_tuple, check_grid, check_tile, tile_order_index

BORDERS = ("inward", "clip")


@dataclass(frozen=True)
class WindowSpec:
    ndim: int                          # number of real grid axes (1..3)
    grid: Tuple[int, int, int]         # padded with leading 1s
    window: Optional[Tuple[int, int, int]]  # per-axis box size, -1 resolved (see below); None for a circle
    radius: Optional[int]
    border: str
    num_prefix: int
    tile: Tuple[int, int, int]         # memory layout tile; the whole grid for row-major
    tiled: bool                        # False: grid tokens are row-major

    @property
    def num_grid(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def seq_len(self) -> int:
        return self.num_prefix + self.num_grid

    def padded(self, axis: int) -> bool:
        return axis < 3 - self.ndim


def make_spec(grid: IntOrTuple, window: Optional[IntOrTuple] = None, radius: Optional[int] = None,
              border: str = "inward", num_prefix: int = 0, tile: Optional[IntOrTuple] = None) -> WindowSpec:
    """Validates the geometry arguments; every error names the argument at fault."""
    grid = check_grid(grid)
    ndim = len(grid)
    pad = (1,) * (3 - ndim)
    if border not in BORDERS:
        raise ValueError(f"border must be 'inward' or 'clip', got {border!r}")
    if (window is None) == (radius is None):
        raise ValueError("exactly one of window (a box) and radius (a circle) must be given")
    if not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0, got {num_prefix!r}")
    win = None
    if window is not None:
        w = as_tuple("window", window, ndim)
        for x in w:
            if x < 1 and x != -1:
                raise ValueError(f"window sizes must be >= 1, or -1 for the whole axis, got {w!r}")
        # -1 (whole axis): N under "inward" ([0, N-1]); 2N-1 under "clip" (covers the axis from any p).
        # "inward" windows larger than the axis are the whole axis, so cap them at N.
        win = tuple(
            (n if x == -1 else min(x, n)) if border == "inward" else (2 * n - 1 if x == -1 else x)
            for x, n in zip(w, grid))
        win = pad + win
    if radius is not None:
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
            raise ValueError(f"radius must be an int >= 1, got {radius!r}")
    if tile is None:
        layout, tiled = pad + grid, False
    else:
        layout, tiled = pad + check_tile(tile, grid), True
    return WindowSpec(ndim, pad + grid, win, radius, border, num_prefix, layout, tiled)


# ---------------------------------------------------------------------------------------------
# Per-axis rules (vectorised over query coordinates p; ints or int tensors).

def box_range(p, n: int, w: int, border: str):
    """Inclusive key range [lo, hi] on one axis of length n for queries at p (box of size w)."""
    if border == "inward":
        lo = _clamp(p - w // 2, 0, n - w)
        return lo, lo + (w - 1)
    return _clamp(p - w // 2, 0, n - 1), _clamp(p + (w - 1 - w // 2), 0, n - 1)


def circle_center(p, n: int, r: int, border: str, padded: bool):
    """Per-axis circle centre: p ("clip", and padded axes) or p clamped to [r-1, n-r] ("inward")."""
    if border == "clip" or padded:
        return p
    return _maximum(_minimum(p, n - r), r - 1)


def _clamp(x, lo, hi):
    # max(lo, min(x, hi)) with lo taking precedence, as in max(0, min(p - w//2, N - w))
    return _maximum(_minimum(x, hi), lo)


def _minimum(a, b):
    return torch.clamp(a, max=b) if isinstance(a, torch.Tensor) else min(a, b)


def _maximum(a, b):
    return torch.clamp(a, min=b) if isinstance(a, torch.Tensor) else max(a, b)


# ---------------------------------------------------------------------------------------------
# Token layout: the stored order of the grid tokens (tile order itself is ops/layout/tiles.py).

def grid_coords(spec: WindowSpec, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3D coordinates of the grid tokens in the order they are stored (row-major or tile order)."""
    n0, n1, n2 = spec.grid
    r = torch.arange(spec.num_grid, device=device, dtype=torch.int64)
    x = (r // (n1 * n2), (r // n2) % n1, r % n2)
    if not spec.tiled:
        return x
    pos = tile_order_index(x, spec.grid, spec.tile)
    out = [torch.empty_like(r) for _ in range(3)]
    for a in range(3):
        out[a][pos] = x[a]
    return tuple(out)


def pair_count(spec: WindowSpec, num_extra: int = 0) -> int:
    """Exact number of (query, key) pairs the mask allows (for effective FLOP counts). Uses
    per-axis histograms of key - centre offsets, so it never builds a mask."""
    P, G = spec.num_prefix, spec.num_grid
    total = P * (P + G) + G * P + G * num_extra
    hists = []
    for a in range(3):
        n = spec.grid[a]
        p = torch.arange(n).unsqueeze(1)
        k = torch.arange(n).unsqueeze(0)
        if spec.window is not None:
            lo, hi = box_range(p, n, spec.window[a], spec.border)
            hists.append(int(((k >= lo) & (k <= hi)).sum()))
        else:
            c = circle_center(p, n, spec.radius, spec.border, spec.padded(a))
            d = (k - c).flatten()
            hists.append(torch.bincount(d + n + spec.radius, minlength=2 * (n + spec.radius) + 1))
    if spec.window is not None:
        return total + math.prod(hists)
    r = spec.radius
    offs = [torch.arange(h.numel()) - (spec.grid[a] + r) for a, h in enumerate(hists)]
    d0, d1, d2 = torch.meshgrid(*offs, indexing="ij")
    inside = (d0 * d0 + d1 * d1 + d2 * d2) < r * r
    counts = hists[0][:, None, None] * hists[1][None, :, None] * hists[2][None, None, :]
    return total + int((counts * inside).sum())
