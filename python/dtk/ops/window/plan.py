"""Analytic block-sparse plan for window attention (docs/architecture.md, "The window plan").

Blocks are boxes of at most `block_q` (query) or `block_k` (key) grid tokens that are contiguous
in memory: the memory layout is split into layout tiles (the `tile` argument, or the whole grid
for row-major), and each layout tile into sub-boxes of whole rows/planes (or row segments) that
fit in a block (layout's block_shape / block_geometry, ops/layout/tiles.py). For every
query block the plan lists the key blocks its window reaches, each flagged full (no element
mask needed) or partial. Everything is built with a fixed number of tensor ops on the plan's
device, in O(#blocks x #entries) work, without a host sync and without any S x S mask; a new grid
only builds a new plan, never a new kernel.

Layouts: q_blocks[n, 7] = (start, origin0..2, extent0..2);
entries[n, L, 8] = (start, origin0..2, extent0..2, full); kv_count[n] = (c0, c1, c2, c3, c4): entries
[0, c0) are full and exactly block_k long (no mask at all), [c0, c2) full but shorter (only the
block's length masks columns), [c2, c4) partial (element mask), the rest padding. Entries of the
plan's `key_shape` (the extents of an interior tile's key blocks) come first in both groups: the
full ones [c0, c1) when that shape is shorter than block_k, the partial ones [c2, c3). Their keys'
offsets from the block origin are the same for all of them, so the kernel computes those once per
program instead of per block. Key blocks may be smaller than query blocks (finer key blocks
waste fewer keys at the window's edges).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..layout import block_fill as _layout_block_fill
from ..layout import block_geometry, block_shape
from .spec import WindowSpec, box_range, circle_center, grid_coords


@dataclass(frozen=True)
class WindowPlan:
    q_blocks: torch.Tensor   # (n, 7) int32
    entries: torch.Tensor    # (n, L, 8) int32
    kv_count: torch.Tensor   # (n, 5) int32: ends of the entry ranks (full-size, full-short key_shape,
                             # other full-short, partial key_shape, other partial)
    order: torch.Tensor      # (n,) int32: q blocks by decreasing work (programs take them in this order)
    num_blocks: int
    max_entries: int
    block_q: int
    block_k: int
    key_shape: tuple         # extents of the key blocks of interior layout tiles


@dataclass(frozen=True)
class CoordTable:
    table: torch.Tensor      # (num_grid,) int32: grid token t (layout order) at (x0 << shift0) | (x1 << shift1) | x2
    shift0: int
    shift1: int
    mask1: int
    mask2: int


@lru_cache(maxsize=16)
def coord_table(spec: WindowSpec, device: torch.device):
    """The grid coordinates of every grid token in layout order, packed into one int32 per token
    (the kernels read a block's key coordinates with one load instead of dividing its positions by
    the block's extents); None when the three coordinates need more than 31 bits."""
    bits = [max(1, (n - 1).bit_length()) for n in spec.grid]
    if sum(bits) > 31:
        return None
    x0, x1, x2 = grid_coords(spec, torch.device("cpu"))
    packed = (x0 << (bits[1] + bits[2])) | (x1 << bits[2]) | x2
    return CoordTable(packed.to(device=device, dtype=torch.int32), bits[1] + bits[2], bits[2],
                      (1 << bits[1]) - 1, (1 << bits[2]) - 1)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _tile_extent(t, n, u):
    return torch.clamp(n - t * u, max=u)


def _tile_offset(t0, t1, t2, h0, h1, spec: WindowSpec):
    """Memory position (within the grid tokens) of the first token of layout tile (t0,t1,t2)."""
    n0, n1, n2 = spec.grid
    u0, u1, u2 = spec.tile
    return t0 * (u0 * n1 * n2) + h0 * (t1 * u1 * n2) + h0 * h1 * (t2 * u2)


def _unravel(i, dims):
    """Row-major unravel of index tensor i over dims (tensors or ints broadcastable with i)."""
    d1d2 = dims[1] * dims[2]
    return i // d1d2, (i // dims[2]) % dims[1], i % dims[2]


def block_fill(spec: WindowSpec, block: int) -> float:
    """layout's block_fill of spec's grid and layout tile: grid tokens / token slots of the blocks of
    at most `block` tokens (1 when every block is full)."""
    return _layout_block_fill(spec.grid, spec.tile, block)


def _key_range(spec: WindowSpec, a: int, pmin, pmax):
    n = spec.grid[a]
    if spec.window is not None:
        lo, _ = box_range(pmin, n, spec.window[a], spec.border)
        _, hi = box_range(pmax, n, spec.window[a], spec.border)
        return lo, hi
    r = spec.radius
    cmin = circle_center(pmin, n, r, spec.border, spec.padded(a))
    cmax = circle_center(pmax, n, r, spec.border, spec.padded(a))
    return torch.clamp(cmin - (r - 1), min=0), torch.clamp(cmax + (r - 1), max=n - 1)


@lru_cache(maxsize=16)  # a plan is small (int32 block lists) but lives on the device
def build_plan(spec: WindowSpec, block_q: int, block_k: int, device: torch.device) -> WindowPlan:
    """The plan of `spec` for query blocks of at most `block_q` tokens and key blocks of at most
    `block_k`, on `device` (cached per geometry)."""
    dev, i64 = device, torch.int64
    N, U, P = spec.grid, spec.tile, spec.num_prefix
    nt = [_ceil_div(n, u) for n, u in zip(N, U)]
    num_blocks, nsub_max, _, _, ext_max = block_geometry(N, U, block_q)
    _, _, vmin, ns_max, _ = block_geometry(N, U, block_k)

    def tile_info(t0, t1, t2, block):
        h = [_tile_extent(t, n, u) for t, n, u in zip((t0, t1, t2), N, U)]
        v = block_shape(*h, block)
        ns = [_ceil_div(x, y) for x, y in zip(h, v)]
        return h, v, ns

    def block_desc(t, h, v, sub):
        """(start, origin, extent) of sub-box `sub` of tile t."""
        local = [s * x for s, x in zip(sub, v)]
        ext = [torch.minimum(x, hh - lo) for x, hh, lo in zip(v, h, local)]
        origin = [tt * u + lo for tt, u, lo in zip(t, U, local)]
        start = P + _tile_offset(*t, h[0], h[1], spec) + local[0] * h[1] * h[2] + local[1] * h[2] + local[2]
        return start, origin, ext

    # --- query blocks: every (tile, sub-box), compacted in memory order.
    tid = torch.arange(nt[0] * nt[1] * nt[2], device=dev, dtype=i64)[:, None]
    t = _unravel(tid, nt)
    h, v, ns = tile_info(*t, block_q)
    s = torch.arange(nsub_max, device=dev, dtype=i64)[None, :]
    sub = _unravel(s, ns)
    valid = s < ns[0] * ns[1] * ns[2]
    start, origin, ext = block_desc(t, h, v, sub)
    qb = torch.stack([start.expand_as(valid), *(o.expand_as(valid) for o in origin),
                      *(e.expand_as(valid) for e in ext)], -1).reshape(-1, 7)
    keep = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)[:num_blocks]
    qb = qb[keep]                                            # (n, 7) int64

    # --- key range of each query block, per axis.
    qo, qe = qb[:, 1:4], qb[:, 4:7]
    klo, khi = zip(*(_key_range(spec, a, qo[:, a], qo[:, a] + qe[:, a] - 1) for a in range(3)))

    # Static enumeration bounds: key span per axis <= query extent + window extent - 1.
    ct, cs = [], []
    for a in range(3):
        wext = spec.window[a] if spec.window is not None else 2 * spec.radius - 1
        span = min(N[a], ext_max[a] + wext - 1)
        ct.append(min(nt[a], (span - 1) // U[a] + 2))
        cs.append(min(ns_max[a], (span - 1) // vmin[a] + 2))
    n_ct, n_cs = math.prod(ct), math.prod(cs)

    # --- candidate key tiles (axis 1 of the entry tensors) x sub-boxes inside them (axis 2).
    j = _unravel(torch.arange(n_ct, device=dev, dtype=i64)[None, :, None], ct)
    tlo = [(x // u)[:, None, None] for x, u in zip(klo, U)]
    thi = [(x // u)[:, None, None] for x, u in zip(khi, U)]
    kt = [lo + jj for lo, jj in zip(tlo, j)]
    ok = (kt[0] <= thi[0]) & (kt[1] <= thi[1]) & (kt[2] <= thi[2])
    kt = [torch.minimum(x, torch.tensor(n - 1, device=dev)) for x, n in zip(kt, nt)]  # keep invalid ones in range
    kh, kv_, _ = tile_info(*kt, block_k)
    llo = [torch.clamp(x[:, None, None] - tt * u, min=0) for x, tt, u in zip(klo, kt, U)]
    lhi = [torch.minimum(x[:, None, None] - tt * u, hh - 1) for x, tt, u, hh in zip(khi, kt, U, kh)]
    slo = [lo // vv for lo, vv in zip(llo, kv_)]
    shi = [hi // vv for hi, vv in zip(lhi, kv_)]
    c = _unravel(torch.arange(n_cs, device=dev, dtype=i64)[None, None, :], cs)
    ksub = [lo + cc for lo, cc in zip(slo, c)]
    ok = ok & (ksub[0] <= shi[0]) & (ksub[1] <= shi[1]) & (ksub[2] <= shi[2])
    kstart, korig, kext = block_desc(kt, kh, kv_, ksub)

    # --- per pair: skip (circle corners), full (no element mask needed).
    full = torch.ones_like(ok)
    pmin = [qo[:, a][:, None, None] for a in range(3)]
    pmax = [(qo[:, a] + qe[:, a] - 1)[:, None, None] for a in range(3)]
    kmin, kmax = korig, [o + e - 1 for o, e in zip(korig, kext)]
    if spec.window is not None:
        for a in range(3):
            lo_hi_min = box_range(pmin[a], N[a], spec.window[a], spec.border)
            lo_hi_max = box_range(pmax[a], N[a], spec.window[a], spec.border)
            full = full & (lo_hi_max[0] <= kmin[a]) & (lo_hi_min[1] >= kmax[a])
    else:
        r = spec.radius
        dmin2 = torch.zeros_like(kstart)
        dmax2 = torch.zeros_like(kstart)
        for a in range(3):
            cmin = circle_center(pmin[a], N[a], r, spec.border, spec.padded(a))
            cmax = circle_center(pmax[a], N[a], r, spec.border, spec.padded(a))
            dmin = torch.clamp(torch.maximum(kmin[a] - cmax, cmin - kmax[a]), min=0)
            dmax = torch.maximum((kmax[a] - cmin).abs(), (cmax - kmin[a]).abs())
            dmin2 = dmin2 + dmin * dmin
            dmax2 = dmax2 + dmax * dmax
        ok = ok & (dmin2 < r * r)
        full = full & (dmax2 < r * r)
    short = kext[0] * kext[1] * kext[2] < block_k
    key_shape = tuple(block_shape(*U, block_k))      # the key blocks of interior layout tiles
    odd = (kext[0] != key_shape[0]) | (kext[1] != key_shape[1]) | (kext[2] != key_shape[2])

    shape = ok.shape
    ent = torch.stack([x.expand(shape) for x in (kstart, *korig, *kext, full.to(i64))], -1)
    ent = ent.reshape(num_blocks, n_ct * n_cs, 8)
    # rank: 0 full and block_k long, 1 full, short, of key_shape, 2 other full short, 3 partial of
    # key_shape, 4 other partial, 5 padding
    odd8 = odd.to(torch.int8)
    rank = torch.where(ok, torch.where(full, torch.where(short, 1 + odd8, 0), 3 + odd8), 5).to(torch.int8)
    rank = rank.expand(shape).reshape(num_blocks, n_ct * n_cs)
    pos = torch.argsort(rank, dim=1, stable=True)
    ent = torch.gather(ent, 1, pos[..., None].expand(-1, -1, 8))
    count = torch.stack([(rank <= r).sum(1) for r in range(5)], 1)
    work = count[:, 4] * 2 - count[:, 0]                        # masked blocks cost more
    order = torch.argsort(work, descending=True, stable=True)
    return WindowPlan(qb.to(torch.int32).contiguous(), ent.to(torch.int32).contiguous(),
                      count.to(torch.int32).contiguous(), order.to(torch.int32), num_blocks, n_ct * n_cs,
                      block_q, block_k, key_shape)


@dataclass(frozen=True)
class KeyPlan:
    """The plan transposed, for the backward's dk/dv pass: per key block (the plan's blocks, with
    block_q == block_k, so key blocks are the query blocks), the query blocks that see it.
    queries[offsets[2kb] : offsets[2kb+1]] see every key of block kb (no element mask),
    queries[offsets[2kb+1] : offsets[2kb+2]] part of it."""
    plan: WindowPlan
    queries: torch.Tensor    # (n * L,) int32, grouped by key block
    offsets: torch.Tensor    # (2n + 2,) int32


@lru_cache(maxsize=16)
def build_key_plan(spec: WindowSpec, block: int, device: torch.device) -> KeyPlan:
    """The transposed plan of build_plan(spec, block, block, device): one stable sort of the plan's
    entries by (key block, partial), on the device, no host sync, no S x S mask."""
    plan = build_plan(spec, block, block, device)
    n, L = plan.num_blocks, plan.max_entries
    starts = plan.q_blocks[:, 0].contiguous()
    kb = torch.searchsorted(starts, plan.entries[:, :, 0].contiguous()).long()   # blocks are in memory order
    slot = torch.arange(L, device=device)[None, :]
    count = plan.kv_count.long()
    group = torch.where(slot < count[:, 4:5], 2 * kb + (slot >= count[:, 2:3]).long(), 2 * n).reshape(-1)
    order = torch.argsort(group, stable=True)
    queries = torch.arange(n, device=device, dtype=torch.int32).repeat_interleave(L)[order]
    offsets = torch.cumsum(torch.bincount(group, minlength=2 * n + 1), 0)
    offsets = torch.cat([offsets.new_zeros(1), offsets])
    return KeyPlan(plan, queries.contiguous(), offsets.to(torch.int32).contiguous())


def engine_pairs(plan: WindowPlan, spec: WindowSpec, num_extra: int = 0) -> int:
    """(query, key) pairs the Triton engine computes for `plan` (padded rows and columns of short
    blocks included): the tensor-core work. pair_count(spec) / engine_pairs is the plan's
    efficiency, the ceiling on effective / actual TFLOP/s (for block-sparse windows a property of
    the window and the block shapes, not of the kernel)."""
    bq, bk = plan.block_q, plan.block_k
    P, S = spec.num_prefix, spec.seq_len
    pad = lambda n: -(-n // bk) * bk  # noqa: E731   key ranges are walked in whole blocks
    per_block = plan.kv_count[:, 4].long().sum().item() * bk + plan.num_blocks * (pad(P) + pad(num_extra))
    return bq * per_block + -(-P // bq) * bq * pad(S)
