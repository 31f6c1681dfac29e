"""Tile order, host side: argument normalisation, the permutation between row-major and tile order,
and the split of layout tiles into blocks of contiguous tokens (which the window plan is built
from, and which `suggest_tile` scores).

Tile order: tiles row-major over the tile grid, tokens row-major inside a tile; edge tiles may be
partial, so any grid and tile work. Grids of 1 or 2 axes are padded to 3 with leading size-1 axes
(`pad3`), which change nothing. Closed forms identical to csrc/common/layout.h.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]

__all__ = ["IntOrTuple", "as_tuple", "check_grid", "check_tile", "pad3", "tile_order_index", "tile_permutation",
           "block_shape", "block_geometry", "block_fill", "suggest_tile"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def as_tuple(name: str, value: IntOrTuple, ndim: Optional[int]) -> Tuple[int, ...]:
    """`value` as a tuple of ints: an int is repeated `ndim` times, a sequence must hold `ndim`
    ints (one per grid axis). With ndim None a sequence may hold any number, and an int is one
    value. Errors name the argument."""
    what = "a sequence of ints" if ndim is None else f"a tuple of {ndim} ints (one per grid axis)"
    if _is_int(value):
        return (value,) * (1 if ndim is None else ndim)
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or {what}, got {value!r}")
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or {what}, got {value!r}") from None
    if (ndim is not None and len(value) != ndim) or not all(_is_int(x) for x in value):
        raise ValueError(f"{name} must be an int or {what}, got {value!r}")
    return value


def check_grid(grid: IntOrTuple) -> Tuple[int, ...]:
    """The grid as 1, 2 or 3 sizes >= 1: (L), (H, W) or (T, H, W) (an int is a 1D grid)."""
    g = (grid,) if _is_int(grid) else grid
    try:
        g = tuple(g)
    except TypeError:
        raise ValueError(f"grid must be 1, 2 or 3 ints (L), (H, W) or (T, H, W), got {grid!r}") from None
    if not 1 <= len(g) <= 3 or not all(_is_int(n) for n in g):
        raise ValueError(f"grid must be 1, 2 or 3 ints (L), (H, W) or (T, H, W), got {g!r}")
    if any(n < 1 for n in g):
        raise ValueError(f"grid sizes must be >= 1, got {g!r}")
    return g


def check_tile(tile: IntOrTuple, grid: Tuple[int, ...]) -> Tuple[int, ...]:
    """One tile size >= 1 per axis of the (checked) grid, clipped to the grid."""
    t = as_tuple("tile", tile, len(grid))
    if any(x < 1 for x in t):
        raise ValueError(f"tile sizes must be >= 1, got {t!r}")
    return tuple(min(x, n) for x, n in zip(t, grid))


def pad3(sizes: Sequence[int]) -> Tuple[int, int, int]:
    """Sizes of 1..3 axes padded to 3 with leading 1s."""
    return (1,) * (3 - len(sizes)) + tuple(sizes)


# ---------------------------------------------------------------------------------------------
# Row-major coordinates <-> position in tile order.

def tile_order_index(coords: Sequence[torch.Tensor], grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """Position in tile order (tiles row-major over the tile grid, row-major inside a tile; edge
    tiles partial) of the tokens at 3D coordinates `coords` (int64 tensors); grid and tile are 3D."""
    n0, n1, n2 = grid
    u0, u1, u2 = tile
    x0, x1, x2 = coords
    t0, t1, t2 = x0 // u0, x1 // u1, x2 // u2
    h0 = torch.clamp(n0 - t0 * u0, max=u0)  # extents of the tile holding each token
    h1 = torch.clamp(n1 - t1 * u1, max=u1)
    h2 = torch.clamp(n2 - t2 * u2, max=u2)
    before = t0 * u0 * n1 * n2 + h0 * (t1 * u1 * n2) + h0 * h1 * (t2 * u2)
    return before + (x0 - t0 * u0) * h1 * h2 + (x1 - t1 * u1) * h2 + (x2 - t2 * u2)


def tile_permutation(grid: IntOrTuple, tile: IntOrTuple, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(perm, inv)` int64 with `x_tiled = x[:, perm]` and `x = x_tiled[:, inv]` for grid tokens
    (row-major -> tile order and back). Tiles are row-major over the tile grid, tokens row-major
    inside a tile; edge tiles may be partial, so any grid and tile work."""
    g = check_grid(grid)
    G, U = pad3(g), pad3(check_tile(tile, g))
    n0, n1, n2 = G
    r = torch.arange(math.prod(G), device=device, dtype=torch.int64)
    inv = tile_order_index((r // (n1 * n2), (r // n2) % n1, r % n2), G, U)
    perm = torch.empty_like(inv)
    perm[inv] = r
    return perm, inv


# ---------------------------------------------------------------------------------------------
# Layout tiles split into blocks of contiguous tokens.

def _balanced(n, cap):
    """Largest piece size that splits n into ceil(n / cap) nearly equal pieces."""
    pieces = (n + cap - 1) // cap
    return (n + pieces - 1) // pieces


def _ceil_div(a, b):
    return (a + b - 1) // b


def block_shape(h0, h1, h2, cap):
    """Sub-box of a row-major layout tile of extents (h0,h1,h2) holding <= cap tokens that stays
    contiguous in memory: a row segment, whole rows, or whole planes. Works on ints and tensors."""
    is_t = isinstance(h2, torch.Tensor)
    where = torch.where if is_t else (lambda c, a, b: a if c else b)
    v2 = _balanced(h2, cap)
    full2 = v2 == h2
    cap1 = (cap // h2).clamp(min=1) if is_t else max(cap // h2, 1)
    v1 = where(full2, _balanced(h1, cap1), 1 if not is_t else torch.ones_like(h1))
    full1 = full2 & (v1 == h1)
    cap0 = (cap // (h1 * h2)).clamp(min=1) if is_t else max(cap // (h1 * h2), 1)
    v0 = where(full1, _balanced(h0, cap0), 1 if not is_t else torch.ones_like(h0))
    return v0, v1, v2


def block_geometry(grid: Sequence[int], tile: Sequence[int], block: int):
    """Static facts of the blocks of at most `block` tokens that the layout tiles `tile` (3D,
    clipped to the 3D `grid`) split into, from Python ints only (no device work): (block count,
    most blocks in one tile, smallest block extent per axis, most blocks per tile per axis,
    largest block extent per axis)."""
    types = []
    for a in range(3):
        n, u = grid[a], tile[a]
        full, last = n // u, n - (n // u) * u
        types.append([(u, full)] + ([(last, 1)] if last else []))
    num_blocks, nsub_max, vmin, ns_max, ext_max = 0, 1, [block] * 3, [1, 1, 1], [1, 1, 1]
    for (h0, c0), (h1, c1), (h2, c2) in itertools.product(*types):
        v = block_shape(h0, h1, h2, block)
        ns = [_ceil_div(h, x) for h, x in zip((h0, h1, h2), v)]
        num_blocks += c0 * c1 * c2 * math.prod(ns)
        nsub_max = max(nsub_max, math.prod(ns))
        for a in range(3):
            vmin[a] = min(vmin[a], v[a])
            ns_max[a] = max(ns_max[a], ns[a])
            ext_max[a] = max(ext_max[a], v[a])
    return num_blocks, nsub_max, vmin, ns_max, ext_max


@lru_cache(maxsize=64)
def block_fill(grid: Tuple[int, ...], tile: Tuple[int, ...], block: int) -> float:
    """Grid tokens / token slots of the blocks of at most `block` tokens the layout tiles split into
    (host arithmetic only): 1 when every block is full. A (21, 3, 2) tile (126 tokens) is one
    nearly full 128-block, but three 42-token 64-blocks: 2/3 of every 64-key block is padding.
    grid and tile: one size per axis (1..3 axes), the tile clipped to the grid."""
    G = pad3(tuple(grid))
    U = pad3(tuple(min(u, n) for u, n in zip(tile, grid)))
    return math.prod(G) / (block_geometry(G, U, block)[0] * block)


def _axis_cover(n: int, u: int, w: int) -> float:
    """Keys one query needs / keys its interior tile's key blocks cover, on one axis of length n
    with layout tiles of u and a window of w (w >= n: the whole axis): the union of the tile's
    windows (w + u - 1 keys) rounded out to whole tiles."""
    if w >= n:
        return 1.0
    lo = -(w // 2) % u                      # where the union starts inside its first tile
    cover = -(-(lo + w + u - 1) // u) * u
    return w / min(cover, -(-n // u) * u)


def suggest_tile(grid: IntOrTuple, window: Optional[IntOrTuple] = None, *, radius: Optional[int] = None,
                 block: int = 128) -> Optional[Tuple[int, ...]]:
    """The layout tile (one per grid axis) that wastes the least tensor-core work at `block`-token
    blocks, by a host-only estimate: per axis the window's share of the key tiles a query tile
    reaches (interior tiles), times how full the tiles fill the blocks. None when row-major is
    as good. FreeSwim at 1080p (grid (21, 68, 120), window (-1, 31, 53)) gets (21, 3, 2): the
    time axis is in every window, so tiles spanning it waste nothing there, and a 3 x 2 footprint
    adds the least halo (plan efficiency 0.88 against 0.59 for (7, 2, 8)).

    window: a box per axis (-1: the whole axis), or radius: a circle (exactly one of them)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    g = check_grid(grid)
    if (window is None) == (radius is None):
        raise ValueError("exactly one of window (a box) and radius (a circle) must be given")
    if window is not None:
        w = as_tuple("window", window, len(g))
        if any(x < 1 and x != -1 for x in w):
            raise ValueError(f"window sizes must be >= 1, or -1 for the whole axis, got {w!r}")
        # the box's extent on each axis (-1 or larger than the axis: the whole axis)
        w = tuple(n if x == -1 or x >= n else x for x, n in zip(w, g))
    else:
        if not _is_int(radius) or radius < 1:
            raise ValueError(f"radius must be an int >= 1, got {radius!r}")
        w = (2 * radius - 1,) * len(g)      # a circle's bounding box
    return _suggest_tile(g, w, block)


@lru_cache(maxsize=64)
def _suggest_tile(n: Tuple[int, ...], w: Tuple[int, ...], block: int) -> Optional[Tuple[int, ...]]:
    def score(u):
        cover = math.prod(_axis_cover(na, ua, wa) for na, ua, wa in zip(n, u, w))
        fill = block_fill(n, u, block)
        return cover * fill * fill      # query blocks and key blocks

    best, best_score = None, score(tuple(n))    # row-major
    for u in itertools.product(*(range(1, min(na, block) + 1) for na in n)):
        if block // 2 < math.prod(u) <= block:
            sc = score(u)
            if sc > best_score + 1e-9:
                best, best_score = u, sc
    return best
