"""Window geometry shared by the window engines' Triton kernels (triton.py, triton_backward.py,
triton_single_loop.py): plan block descriptors, grid coordinates of a block's positions (by
division or from the packed coordinate table, plan.coord_table), each query's window (box bounds
or circle centre), the element masks (tested per score, or for box windows added to the scores by
small tensor-core dots), and the host-side kernel arguments that describe a window
(docs/architecture.md, "The window plan")."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .plan import coord_table
from .spec import WindowSpec


@triton.jit
def block_desc(QB, i):
    """(start, origin0..2, extent0..2) of plan block i (a row of the (n, 7) q_blocks table)."""
    row = QB + i * 7
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            tl.load(row + 6))


@triton.jit
def coords(i, o0, o1, o2, e1, e2):
    """Grid coordinates of positions i (0 <= i < 2^20) of a row-major box of extents (., e1, e2)
    at origin (o0, o1, o2). Quotients through a float reciprocal: (i + 0.5) / e is at least 0.5/e
    away from an integer, far beyond fp32 error at these sizes, so truncation is exact and costs
    ~4 instructions where an integer division by a runtime value costs ~25 (per key column, per
    partial block)."""
    e12 = e1 * e2
    a = ((i.to(tl.float32) + 0.5) * (1.0 / e12.to(tl.float32))).to(tl.int32)
    r = i - a * e12
    b = ((r.to(tl.float32) + 0.5) * (1.0 / e2.to(tl.float32))).to(tl.int32)
    return o0 + a, o1 + b, o2 + (r - b * e2)


@triton.jit
def table_coords(CT, idx, ok, SH0, SH1, M1, M2):
    """Grid coordinates of grid tokens idx (layout order) from the packed coordinate table
    (plan.coord_table): one load and three shifts / masks per token, where coords' quotients
    take ~10 instructions (per key column of every partial block)."""
    c = tl.load(CT + idx, mask=ok, other=0)
    return c >> SH0, (c >> SH1) & M1, c & M2


@triton.jit
def in_range(y, lo, span):
    """lo <= y <= lo + span (broadcast), as one unsigned compare (y - lo < 0 wraps)."""
    return (y - lo).to(tl.uint32, bitcast=True) <= span.to(tl.uint32, bitcast=True)


@triton.jit
def query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, IS_BOX: tl.constexpr):
    """Per query at grid coordinates x: its box (lo, hi per axis) or, for circles, its centre
    (returned as lo = hi)."""
    if IS_BOX:
        lo0 = tl.where(INWARD, tl.maximum(tl.minimum(x0 - W0 // 2, N0 - W0), 0), tl.maximum(x0 - W0 // 2, 0))
        lo1 = tl.where(INWARD, tl.maximum(tl.minimum(x1 - W1 // 2, N1 - W1), 0), tl.maximum(x1 - W1 // 2, 0))
        lo2 = tl.where(INWARD, tl.maximum(tl.minimum(x2 - W2 // 2, N2 - W2), 0), tl.maximum(x2 - W2 // 2, 0))
        hi0 = tl.where(INWARD, lo0 + W0 - 1, x0 + (W0 - 1 - W0 // 2))
        hi1 = tl.where(INWARD, lo1 + W1 - 1, x1 + (W1 - 1 - W1 // 2))
        hi2 = tl.where(INWARD, lo2 + W2 - 1, x2 + (W2 - 1 - W2 // 2))
    else:
        lo0 = tl.where(INWARD & (PAD0 == 0), tl.maximum(tl.minimum(x0, N0 - R), R - 1), x0)
        lo1 = tl.where(INWARD & (PAD1 == 0), tl.maximum(tl.minimum(x1, N1 - R), R - 1), x1)
        lo2 = tl.where(INWARD, tl.maximum(tl.minimum(x2, N2 - R), R - 1), x2)
        hi0 = lo0
        hi1 = lo1
        hi2 = lo2
    return lo0, lo1, lo2, hi0, hi1, hi2


@triton.jit
def window_allowed(allowed, y0, y1, y2, lo0, lo1, lo2, hi0, hi1, hi2, R, IS_BOX: tl.constexpr, AXES: tl.constexpr):
    """allowed & (key at y in the query's window), all arguments broadcast against each other
    (queries along one axis of the tile, keys along the other). AXES (bit a: axis a can exclude
    keys) drops the tests of axes the window spans whole (size-1 axes of 1D/2D grids, FreeSwim's
    full time axis)."""
    if IS_BOX:
        if AXES & 1:
            allowed = allowed & in_range(y0, lo0, hi0 - lo0)
        if AXES & 2:
            allowed = allowed & in_range(y1, lo1, hi1 - lo1)
        if AXES & 4:
            allowed = allowed & in_range(y2, lo2, hi2 - lo2)
    else:
        d2 = y2 - lo2
        d2 = d2 * d2
        if AXES & 2:
            d1 = y1 - lo1
            d2 += d1 * d1
        if AXES & 1:
            d0 = y0 - lo0
            d2 += d0 * d0
        allowed = allowed & (d2 < R * R)
    return allowed


@triton.jit
def local_offsets(j, E1, E2):
    """Offsets (l0, l1, l2) from the origin of a row-major (., E1, E2) block of its positions j,
    packed as l0 << 20 | l1 << 10 | l2 (E1, E2 <= 1024)."""
    l0, l1, l2 = coords(j, 0, 0, 0, E1, E2)
    return (l0 << 20) | (l1 << 10) | l2


@triton.jit
def unpack_offsets(lp):
    """(l0, l1, l2) of local_offsets' packed offsets."""
    return lp >> 20, (lp >> 10) & 1023, lp & 1023


@triton.jit
def local_allowed(lp, ke0, r0, r1, r2, sp0, sp1, sp2, R, IS_BOX: tl.constexpr, AXES: tl.constexpr,
                   SHORT: tl.constexpr):
    """Element mask of a key block whose columns have the packed offsets lp (local_offsets) from
    its origin: per query row the window's lower bounds r (boxes, with spans sp = hi - lo) or
    circle centres r, both relative to that origin, tested on the axes in AXES; with SHORT also
    whether a column is one of the block's keys (axis-0 offset below the block's extent ke0).
    Boxes: every test is a difference that is negative where it fails, their OR tested once (sign
    bit). Circles: |l - r|^2 < R^2 as sum(l^2) - 2 sum(l r) < R^2 - sum(r^2), the first term per
    column (+2^30 on columns that are not keys), the last per row: one multiply-add per axis and
    one compare per score."""
    l0, l1, l2 = unpack_offsets(lp)
    if IS_BOX:
        x = (l2 - l2)[None, :]   # zeros: the OR's identity (folded)
        if AXES & 1:
            x = x | (l0[None, :] - r0[:, None]) | ((r0 + sp0)[:, None] - l0[None, :])
        if AXES & 2:
            x = x | (l1[None, :] - r1[:, None]) | ((r1 + sp1)[:, None] - l1[None, :])
        if AXES & 4:
            x = x | (l2[None, :] - r2[:, None]) | ((r2 + sp2)[:, None] - l2[None, :])
        if SHORT:
            x = x | (ke0 - 1 - l0)[None, :]
        allowed = x >= 0
    else:
        a = l2 * l2
        t_row = R * R - r2 * r2
        if AXES & 2:
            a += l1 * l1
            t_row -= r1 * r1
        if AXES & 1:
            a += l0 * l0
            t_row -= r0 * r0
        if SHORT:
            a = tl.where(l0 < ke0, a, a + (1 << 30))
        t = a[None, :] + l2[None, :] * (-2 * r2)[:, None]
        if AXES & 2:
            t += l1[None, :] * (-2 * r1)[:, None]
        if AXES & 1:
            t += l0[None, :] * (-2 * r0)[:, None]
        allowed = t < t_row[:, None]
    return allowed


@triton.jit
def onehot(l, alive, DEAD: tl.constexpr, F32: tl.constexpr):
    """(16, BN) operand of the mask dots for one axis: row p of column j is 1 where key j's offset
    l on this axis is p; for the columns that are not keys of the key shape (alive False) the
    row is 15 in the DEAD group and none elsewhere."""
    p = tl.arange(0, 16)[:, None]
    hot = alive[None, :] & (l[None, :] == p)
    if DEAD:
        hot = hot | (~alive[None, :] & (p == 15))
    return mask_operand(hot, F32)


@triton.jit
def mask_operand(x, F32: tl.constexpr):
    """A mask dot's operand: fp32 in the interpreter (its bf16 dots are unreliable), else bf16."""
    if F32:
        return x.to(tl.float32)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def dead_mask_dot(s, oh0, oh1, oh2, big, DEAD: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr):
    """s with -big added to the columns that are not keys of the key shape (row 15 of the DEAD
    group's one-hot operand): a full block of that shape shorter than BLOCK_N."""
    x = mask_operand(tl.where(tl.arange(0, 16)[None, :] == 15, -big, tl.zeros([BLOCK_M, 16], tl.float32)), F32)
    if DEAD == 0:
        s = tl.dot(x, oh0, s)
    elif DEAD == 1:
        s = tl.dot(x, oh1, s)
    else:
        s = tl.dot(x, oh2, s)
    return s


@triton.jit
def box_mask_dot(s, oh, r, u, big, LIMITS: tl.constexpr, DEAD: tl.constexpr, F32: tl.constexpr):
    """s + X @ oh (an onehot operand) for one axis of a box window: X[i, p] = -big unless the query row i's window
    spans offset p on this axis (r_i <= p <= u_i; every p where the axis does not LIMIT it), and
    -big at p = 15 in the DEAD group (the columns that are not keys of the block). Allowed scores
    get exactly 0 added; the others at least `big` less (see online_update's FLOORED)."""
    p = tl.arange(0, 16)[None, :]
    if LIMITS:
        ok = ((p - r[:, None]) | (u[:, None] - p)) >= 0
    else:   # every offset (only the DEAD one below): all true, broadcast over the rows (folded)
        ok = (r[:, None] - r[:, None] + p) >= 0
    if DEAD:
        ok = ok & (p != 15)
    return tl.dot(mask_operand(tl.where(ok, 0.0, -big), F32), oh, s)


# Triton specialises int arguments on == 1 and divisibility by 16: the grid geometry is kept out of
# that so that a new grid (resolution) reuses the compiled kernel. Strides stay specialised (their
# divisibility gives vectorised loads); a grid can still compile anew where it changes one's.
GEOMETRY_ARGS = ["S", "P", "N0", "N1", "N2", "W0", "W1", "W2", "R", "PAD0", "PAD1", "CSH0", "CSH1", "CM1", "CM2"]


def limiting_axes(spec: WindowSpec) -> int:
    """Bit mask of the axes on which the window can exclude a key (bit 2 always set for circles,
    whose kernel tests the last axis unconditionally). A box axis is free when every query's range
    covers it; a circle axis when it has one position and its centre is that position."""
    bits = 0
    for a, n in enumerate(spec.grid):
        if spec.window is not None:
            w = spec.window[a]
            covers = w >= n if spec.border == "inward" else min(w // 2, w - 1 - w // 2) >= n - 1
            free = covers
        else:
            free = n == 1 and (spec.border == "clip" or spec.padded(a))
        if not free or (a == 2 and spec.window is None):
            bits |= 1 << a
    return bits


def mask_args(spec: WindowSpec, plan, qk_scale: float, device: torch.device, by_dot: bool):
    """The kernels' (mask_big, mask_floor) arguments and MASK_DOT / DEAD / MASK_F32 / KEY_SHORT
    constexprs for the blocks of the plan's key shape. `by_dot` (the window_mask_by_dot setting):
    box windows add their partial blocks' masks to the scores with small tensor-core dots
    (box_mask_dot) where the key shape allows it, instead of testing every score
    (local_allowed). The mask dots take box windows whose key
    shape spans at most 16 offsets on every limiting axis; a key shape shorter than the key block
    needs a spare offset (15) on some axis for the columns that are not keys (DEAD). The dots run
    in bf16 on a GPU (0, 1 and powers of two are exact), in fp32 in the interpreter (MASK_F32).
    mask_big * qk_scale = 2^24: masked scores end ~2^24 below the row's real maximum and 2^23
    below the floor. LOCAL: the key-shape loops at all (key blocks of at most 64, or mask dots)."""
    axes = limiting_axes(spec)
    ext = plan.key_shape
    short = ext[0] * ext[1] * ext[2] < plan.block_k
    ok = (by_dot and spec.window is not None and axes != 0
          and all(ext[a] <= 16 for a in range(3) if axes >> a & 1)
          and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8))
    dead = -1
    if ok and short:
        spare = [a for a in range(3) if ext[a] <= 15]
        limiting = [a for a in spare if axes >> a & 1]
        dead = (limiting or spare or [-1])[-1]
        ok = dead >= 0
    big = 2.0 ** min(100, max(1, math.ceil(math.log2(2.0 ** 24 / qk_scale))))
    return (big, -0.5 * big * qk_scale), dict(MASK_DOT=ok, DEAD=dead if ok else -1, MASK_F32=device.type != "cuda",
                                              KEY_SHORT=short, LOCAL=ok or plan.block_k <= 64)


def window_args(spec: WindowSpec) -> tuple:
    """The kernels' window arguments: N0..2, W0..2 (1 for circles), R (1 for boxes), INWARD, PAD0,
    PAD1."""
    return (*spec.grid, *(spec.window or (1, 1, 1)), spec.radius or 1, spec.border == "inward", spec.padded(0),
            spec.padded(1))


def geometry_args(spec: WindowSpec, device: torch.device):
    """The main kernels' window geometry arguments: window_args, then the packed coordinate table
    CT with its shifts CSH0, CSH1 and masks CM1, CM2 (a dummy when the grid's coordinates do not
    fit 31 bits), and the COORDS constexpr."""
    ct = coord_table(spec, device)
    table = (ct.table, ct.shift0, ct.shift1, ct.mask1, ct.mask2) if ct else (torch.empty(1, dtype=torch.int32,
                                                                                        device=device), 0, 0, 0, 0)
    return (*window_args(spec), *table), ct is not None
