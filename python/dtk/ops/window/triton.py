"""Triton engine for window attention: one program per (query block, batch x head) walks the
plan's key blocks with an online softmax; element masks are evaluated only on partial blocks. The
blocks of the plan's key shape (interior tiles) take their keys' offsets from the block origin,
computed once per program, and box windows add their masks on the tensor cores (_box_mask_dot);
the other blocks (edge tiles) read grid coordinates from a packed per-token table
(plan.coord_table). Scores stay raw until the exponent, where one FMA applies the scale (log2
units). Prefix (global) queries and keys and the extra keys are dense ranges around the plan; the
prefix query rows go to the dense kernel (cuDNN) on a side stream by default (PREFIX_BY_DENSE).
Switches measured on a GPU before they become defaults: K / V blocks by TMA copies (TMA_LOADS),
and the grid queries by the warp-specialized single-loop engine of triton_ws.py (WS_ENGINE).

Backward (FlashAttention-2 style, from the forward's lse): the same query-side walk computes dq
(`_window_fwd` with BWD=True), and `_window_bwd_dkdv` walks the transposed plan (per key block,
the query blocks that see it) for dk and dv, looping over the GQA group's q heads."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ... import _config
from ..._debug import new_output
from ... import _tuning
from .._attention import dense as _dense
from .._attention.dense import concurrent_ok, dense_failed, dense_supported, dense_with_lse, fork_streams, join_streams
from .._attention.triton import (LOG2E, backward_block, backward_launch_configs, backward_row_stats, dense_range,
                                 dkdv_step, finish, fold, head_indices, key_rows, kv_head_indices, launch_configs,
                                 load_rows, online_update, row_state, step, tile_offsets, write_rows)
from .plan import block_fill, build_key_plan, build_plan, coord_table
from .spec import WindowSpec



@triton.jit
def _block_desc(QB, i):
    """(start, origin0..2, extent0..2) of plan block i (a row of the (n, 7) q_blocks table)."""
    row = QB + i * 7
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            tl.load(row + 6))


@triton.jit
def _coords(i, o0, o1, o2, e1, e2):
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
def _table_coords(CT, idx, ok, SH0, SH1, M1, M2):
    """Grid coordinates of grid tokens idx (layout order) from the packed coordinate table
    (plan.coord_table): one load and three shifts / masks per token, where _coords' quotients
    take ~10 instructions (per key column of every partial block)."""
    c = tl.load(CT + idx, mask=ok, other=0)
    return c >> SH0, (c >> SH1) & M1, c & M2


@triton.jit
def _in_range(y, lo, span):
    """lo <= y <= lo + span (broadcast), as one unsigned compare (y - lo < 0 wraps)."""
    return (y - lo).to(tl.uint32, bitcast=True) <= span.to(tl.uint32, bitcast=True)


@triton.jit
def _query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, IS_BOX: tl.constexpr):
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
def _window_allowed(allowed, y0, y1, y2, lo0, lo1, lo2, hi0, hi1, hi2, R, IS_BOX: tl.constexpr, AXES: tl.constexpr):
    """allowed & (key at y in the query's window), all arguments broadcast against each other
    (queries along one axis of the tile, keys along the other). AXES (bit a: axis a can exclude
    keys) drops the tests of axes the window spans whole (size-1 axes of 1D/2D grids, FreeSwim's
    full time axis)."""
    if IS_BOX:
        if AXES & 1:
            allowed = allowed & _in_range(y0, lo0, hi0 - lo0)
        if AXES & 2:
            allowed = allowed & _in_range(y1, lo1, hi1 - lo1)
        if AXES & 4:
            allowed = allowed & _in_range(y2, lo2, hi2 - lo2)
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
def _local_offsets(j, E1, E2):
    """Offsets (l0, l1, l2) from the origin of a row-major (., E1, E2) block of its positions j,
    packed as l0 << 20 | l1 << 10 | l2 (E1, E2 <= 1024)."""
    l0, l1, l2 = _coords(j, 0, 0, 0, E1, E2)
    return (l0 << 20) | (l1 << 10) | l2


@triton.jit
def _unpack_offsets(lp):
    """(l0, l1, l2) of _local_offsets' packed offsets."""
    return lp >> 20, (lp >> 10) & 1023, lp & 1023


@triton.jit
def _local_allowed(lp, ke0, r0, r1, r2, sp0, sp1, sp2, R, IS_BOX: tl.constexpr, AXES: tl.constexpr,
                   SHORT: tl.constexpr):
    """Element mask of a key block whose columns have the packed offsets lp (_local_offsets) from
    its origin: per query row the window's lower bounds r (boxes, with spans sp = hi - lo) or
    circle centres r, both relative to that origin, tested on the axes in AXES; with SHORT also
    whether a column is one of the block's keys (axis-0 offset below the block's extent ke0).
    Boxes: every test is a difference that is negative where it fails, their OR tested once (sign
    bit). Circles: |l - r|^2 < R^2 as sum(l^2) - 2 sum(l r) < R^2 - sum(r^2), the first term per
    column (+2^30 on columns that are not keys), the last per row: one multiply-add per axis and
    one compare per score."""
    l0, l1, l2 = _unpack_offsets(lp)
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
def _onehot(l, alive, DEAD: tl.constexpr, F32: tl.constexpr):
    """(16, BN) operand of the mask dots for one axis: row p of column j is 1 where key j's offset
    l on this axis is p; for the columns that are not keys of the key shape (alive False) the
    row is 15 in the DEAD group and none elsewhere."""
    p = tl.arange(0, 16)[:, None]
    hot = alive[None, :] & (l[None, :] == p)
    if DEAD:
        hot = hot | (~alive[None, :] & (p == 15))
    return _mask_operand(hot, F32)


@triton.jit
def _mask_operand(x, F32: tl.constexpr):
    """A mask dot's operand: fp32 in the interpreter (its bf16 dots are unreliable), else bf16."""
    if F32:
        return x.to(tl.float32)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _dead_mask_dot(s, oh0, oh1, oh2, big, DEAD: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr):
    """s with -big added to the columns that are not keys of the key shape (row 15 of the DEAD
    group's one-hot operand): a full block of that shape shorter than BLOCK_N."""
    x = _mask_operand(tl.where(tl.arange(0, 16)[None, :] == 15, -big, tl.zeros([BLOCK_M, 16], tl.float32)), F32)
    if DEAD == 0:
        s = tl.dot(x, oh0, s)
    elif DEAD == 1:
        s = tl.dot(x, oh1, s)
    else:
        s = tl.dot(x, oh2, s)
    return s


@triton.jit
def _box_mask_dot(s, onehot, r, u, big, LIMITS: tl.constexpr, DEAD: tl.constexpr, F32: tl.constexpr):
    """s + X @ onehot for one axis of a box window: X[i, p] = -big unless the query row i's window
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
    return tl.dot(_mask_operand(tl.where(ok, 0.0, -big), F32), onehot, s)


# Triton specialises int arguments on == 1 and divisibility by 16: the grid geometry is kept out of
# that so that a new grid (resolution) reuses the compiled kernel. Strides stay specialised (their
# divisibility gives vectorised loads); a grid can still compile anew where it changes one's.
GEOMETRY_ARGS = ["S", "P", "N0", "N1", "N2", "W0", "W1", "W2", "R", "PAD0", "PAD1", "CSH0", "CSH1", "CM1", "CM2"]


@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["E", "L", "N_PQB", "NQB", "KE0", "KE1", "KE2"])
def _window_fwd(
    Q, K, V, EK, EV, O, LSE, QB, ENT, CNT, ORDER,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    sekb, seks, sekh, sevb, sevs, sevh, sob, sos, soh,
    B, H, GROUP, S, P, E, L, N_PQB, NQB, D, KE0, KE1, KE2, mask_big, mask_floor,
    N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, CT, CSH0, CSH1, CM1, CM2,
    qk_scale,
    DO, LSE2, DELTA, sdob, sdos, sdoh, dq_scale, KD, VD,
    IS_BOX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, AXES: tl.constexpr, COORDS: tl.constexpr, KEY_SHORT: tl.constexpr,
    MASK_DOT: tl.constexpr, DEAD: tl.constexpr, MASK_F32: tl.constexpr, LOCAL: tl.constexpr,
    BWD: tl.constexpr = False, TMA: tl.constexpr = False,
):
    # The forward, or with BWD the dq pass of the backward (same walk over the keys; O is dq, DO
    # the output gradient, LSE2 / DELTA the rows' lse (log2 units) and delta, see step). TMA: the
    # sequence's K and V blocks arrive by tensor-memory-accelerator copies from the (B, H_kv, S, D)
    # descriptors KD, VD (Hopper; the extra keys keep pointer loads), else by pointer loads.
    # 1D grid. First the prefix query blocks (each attends to every key: the heaviest programs)
    # of every head, so none starts late and leaves a tail; then, head by head, the grid query
    # blocks with the query block fastest, so the programs running together share their keys in
    # L2 (neighbouring windows overlap), in the plan's heaviest-first order.
    t = tl.program_id(0)
    n_pre = N_PQB * B * H
    pid = tl.where(t < n_pre, t // (B * H), N_PQB + (t - n_pre) % NQB)
    bh = tl.where(t < n_pre, t % (B * H), (t - n_pre) // NQB)
    b, h, kvh = head_indices(bh, H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    k_ptr = K + b * skb + kvh * skh
    v_ptr = V + b * svb + kvh * svh

    # Query block: a prefix block (rows [pid*BLOCK_M, ...) of the prefix, attending to every
    # sequence key) or a grid block from the plan. Both descriptors are read by every program (a
    # prefix program reads the first plan block's and runs none of its loops).
    is_prefix = pid < N_PQB
    qb = tl.load(ORDER + tl.maximum(pid - N_PQB, 0)).to(tl.int64)
    q_start, qo0, qo1, qo2, qe0, qe1, qe2 = _block_desc(QB, qb)
    q_start = tl.where(is_prefix, pid * BLOCK_M, q_start)
    q_len = tl.where(is_prefix, tl.minimum(P - pid * BLOCK_M, BLOCK_M), qe0 * qe1 * qe2)
    rows_q = (q_start + offs_m).to(tl.int64)
    q_ok = offs_m < q_len
    q = load_rows(Q + b * sqb + h * sqh, rows_q, sqs, offs_d, q_ok, d_mask, True, EVEN_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stats = bh.to(tl.int64) * S
    do, m_i, l_i = row_state(q, DO + b * sdob + h * sdoh, rows_q, sdos, LSE2 + stats, DELTA + stats, rows_q, q_ok,
                              offs_d, d_mask, BLOCK_M, EVEN_D, BWD)

    # No branch on is_prefix: the same loops run for every program with trip counts that are zero
    # where they do not apply (a prefix block sees keys [0, S) and no plan entries). A runtime
    # branch around the loops made ptxas serialise the wgmma pipeline (C7515) and doubled the
    # shared memory (each branch kept its own buffers).
    acc, m_i, l_i = dense_range(q, do, acc, m_i, l_i, k_ptr, v_ptr, sks, svs, 0, tl.where(is_prefix, S, P),
                                 qk_scale, offs_n, offs_d, d_mask, BLOCK_N, BWD, KD, VD, b, kvh, BLOCK_D, TMA)
    # Per-query window geometry, computed once: box bounds or circle centres per axis.
    x0, x1, x2 = _coords(offs_m, qo0, qo1, qo2, qe1, qe2)
    lo0, lo1, lo2, hi0, hi1, hi2 = _query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, IS_BOX)
    ent_ptr = ENT + qb * L * 8
    cnt = CNT + qb * 5
    c0 = tl.where(is_prefix, 0, tl.load(cnt))
    c1 = tl.where(is_prefix, 0, tl.load(cnt + 1))
    c2 = tl.where(is_prefix, 0, tl.load(cnt + 2))
    c3 = tl.where(is_prefix, 0, tl.load(cnt + 3))
    c4 = tl.where(is_prefix, 0, tl.load(cnt + 4))
    # Key rows past a block's keys are read from memory clamped to the last row (no load masks: the
    # scores of those columns are masked instead).
    last = S - 1
    for j in range(0, c0):  # full key blocks of BLOCK_N keys: no mask at all
        e = ent_ptr + j * 8
        start = tl.load(e)
        rows = (start + offs_n).to(tl.int64)
        k = key_rows(KD, b, kvh, start, k_ptr, rows, sks, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        v = key_rows(VD, b, kvh, start, v_ptr, rows, svs, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, None, False, qk_scale, BWD)
    # Blocks of the plan's key shape (KE0, KE1, KE2): a key's offsets from its block's origin depend
    # only on its column, so they are computed once (packed), and the columns past the shape's keys
    # (when it holds fewer than BLOCK_N) are the same in every such block. Boxes with MASK_DOT add
    # masks to the scores on the tensor cores (_box_mask_dot); the others test the scores. Without
    # LOCAL (wide key blocks tested per score: their per-column offsets would spill registers) these
    # blocks take the general loops below.
    short_lo = c0
    odd_lo = c2
    if LOCAL:
        lp = _local_offsets(offs_n, KE1, KE2)
        if MASK_DOT:
            l0, l1, l2 = _unpack_offsets(lp)
            alive = l0 < KE0
            oh0 = _onehot(l0, alive, DEAD == 0, MASK_F32)
            oh1 = _onehot(l1, alive, DEAD == 1, MASK_F32)
            oh2 = _onehot(l2, alive, DEAD == 2, MASK_F32)
        for j in range(c0, c1):  # full blocks of the key shape, shorter than BLOCK_N: mask its missing keys
            e = ent_ptr + j * 8
            start = tl.load(e)
            rows = tl.minimum(start + offs_n, last).to(tl.int64)
            k = key_rows(KD, b, kvh, start, k_ptr, rows, sks, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
            v = key_rows(VD, b, kvh, start, v_ptr, rows, svs, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
            if MASK_DOT:
                s = _dead_mask_dot(tl.dot(q, tl.trans(k)), oh0, oh1, oh2, mask_big, DEAD, MASK_F32, BLOCK_M)
                acc, m_i, l_i = fold(s, do, acc, m_i, l_i, k, v, qk_scale, mask_floor, True, BWD)
            else:
                acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, ((lp >> 20) < KE0)[None, :], True, qk_scale, BWD)
        short_lo = c1
    for j in range(short_lo, c2):  # the other full but shorter key blocks: mask the missing columns only
        e = ent_ptr + j * 8
        n_ok = offs_n < tl.load(e + 4) * tl.load(e + 5) * tl.load(e + 6)
        start = tl.load(e)
        rows = tl.minimum(start + offs_n, last).to(tl.int64)
        k = key_rows(KD, b, kvh, start, k_ptr, rows, sks, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        v = key_rows(VD, b, kvh, start, v_ptr, rows, svs, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, n_ok[None, :], True, qk_scale, BWD)
    if LOCAL:
        sp0, sp1, sp2 = hi0 - lo0, hi1 - lo1, hi2 - lo2
        for j in range(c2, c3):  # partial blocks of the key shape: the window tested relative to its origin
            e = ent_ptr + j * 8
            start = tl.load(e)
            rows = tl.minimum(start + offs_n, last).to(tl.int64)
            k = key_rows(KD, b, kvh, start, k_ptr, rows, sks, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
            v = key_rows(VD, b, kvh, start, v_ptr, rows, svs, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
            r0, r1, r2 = lo0 - tl.load(e + 1), lo1 - tl.load(e + 2), lo2 - tl.load(e + 3)
            if MASK_DOT:
                s = tl.dot(q, tl.trans(k))
                if AXES & 1 or DEAD == 0:
                    s = _box_mask_dot(s, oh0, r0, r0 + sp0, mask_big, AXES & 1, DEAD == 0, MASK_F32)
                if AXES & 2 or DEAD == 1:
                    s = _box_mask_dot(s, oh1, r1, r1 + sp1, mask_big, AXES & 2, DEAD == 1, MASK_F32)
                if AXES & 4 or DEAD == 2:
                    s = _box_mask_dot(s, oh2, r2, r2 + sp2, mask_big, AXES & 4, DEAD == 2, MASK_F32)
                acc, m_i, l_i = fold(s, do, acc, m_i, l_i, k, v, qk_scale, mask_floor, True, BWD)
            else:
                allowed = _local_allowed(lp, KE0, r0, r1, r2, sp0, sp1, sp2, R, IS_BOX, AXES, KEY_SHORT)
                acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, allowed, True, qk_scale, BWD)
        odd_lo = c3
    for j in range(odd_lo, c4):  # the other partial key blocks (edge tiles): element mask from coordinates
        e = ent_ptr + j * 8
        ke1 = tl.load(e + 5)
        ke2 = tl.load(e + 6)
        n_ok = offs_n < tl.load(e + 4) * ke1 * ke2
        start = tl.load(e)
        rows = tl.minimum(start + offs_n, last).to(tl.int64)
        k = key_rows(KD, b, kvh, start, k_ptr, rows, sks, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        v = key_rows(VD, b, kvh, start, v_ptr, rows, svs, offs_d, d_mask, EVEN_D, BLOCK_N, BLOCK_D, TMA)
        if COORDS:
            y0, y1, y2 = _table_coords(CT, start - P + offs_n, n_ok, CSH0, CSH1, CM1, CM2)
        else:
            y0, y1, y2 = _coords(offs_n, tl.load(e + 1), tl.load(e + 2), tl.load(e + 3), ke1, ke2)
        allowed = _window_allowed(n_ok[None, :], y0[None, :], y1[None, :], y2[None, :], lo0[:, None], lo1[:, None],
                                  lo2[:, None], hi0[:, None], hi1[:, None], hi2[:, None], R, IS_BOX, AXES)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, allowed, True, qk_scale, BWD)
    acc, m_i, l_i = dense_range(q, do, acc, m_i, l_i, EK + b * sekb + kvh * sekh, EV + b * sevb + kvh * sevh,
                                 seks, sevs, 0, tl.where(is_prefix, 0, E), qk_scale, offs_n, offs_d, d_mask,
                                 BLOCK_N, BWD)

    write_rows(O + b * sob + h * soh + rows_q[:, None] * sos + offs_d[None, :], LSE + bh.to(tl.int64) * S + rows_q,
                acc, m_i, l_i, q_ok, d_mask, dq_scale, BWD)


@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["NDB", "DENSE_LEN", "DENSE_QLO", "DENSE_QHI", "NKB"])
def _window_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV, QB, TQ, TOFF,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    B, H, GROUP, S, P, NDB, DENSE_LEN, DENSE_QLO, DENSE_QHI, NKB, D,
    N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, CT, CSH0, CSH1, CM1, CM2,
    qk_scale, dk_scale,
    IS_BOX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, AXES: tl.constexpr, COORDS: tl.constexpr,
):
    """dk, dv of one key block for one (batch, kv head), summed over the GQA group's q heads.
    Programs [0, NDB * B * Hkv) take dense key blocks (keys [0, DENSE_LEN) of K, seen by the
    queries [DENSE_QLO, DENSE_QHI): the prefix keys, or the extra keys); the rest take the plan's
    grid key blocks, seen by the prefix queries and by the query blocks the transposed plan lists
    for them (TQ[TOFF[2kb] : TOFF[2kb+1]] full, [TOFF[2kb+1] : TOFF[2kb+2]] partial). Scores are
    computed transposed (keys x queries); a query row outside a block loads lse = +inf, so its
    P is 0 and it needs no mask."""
    t = tl.program_id(0)
    Hkv = H // GROUP
    n_dense = NDB * B * Hkv
    is_dense = t < n_dense
    pid = tl.where(is_dense, t // (B * Hkv), (t - n_dense) % tl.maximum(NKB, 1))
    b, kvh = kv_head_indices(tl.where(is_dense, t % (B * Hkv), (t - n_dense) // tl.maximum(NKB, 1)), H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)

    kb = tl.where(is_dense, 0, pid).to(tl.int64)
    k_start, ko0, ko1, ko2, ke0, ke1, ke2 = _block_desc(QB, kb)
    k_start = tl.where(is_dense, pid * BLOCK_N, k_start)
    k_len = tl.where(is_dense, tl.minimum(DENSE_LEN - pid * BLOCK_N, BLOCK_N), ke0 * ke1 * ke2)
    rows_k = (k_start + offs_n).to(tl.int64)
    k_ok = offs_n < k_len
    k = load_rows(K + b * skb + kvh * skh, rows_k, sks, offs_d, k_ok, d_mask, True, EVEN_D)
    v = load_rows(V + b * svb + kvh * svh, rows_k, svs, offs_d, k_ok, d_mask, True, EVEN_D)
    y0, y1, y2 = _coords(offs_n, ko0, ko1, ko2, ke1, ke2)
    q_lo = tl.where(is_dense, DENSE_QLO, 0)
    q_hi = tl.where(is_dense, DENSE_QHI, P)
    f0 = tl.where(is_dense, 0, tl.load(TOFF + 2 * kb))
    f1 = tl.where(is_dense, 0, tl.load(TOFF + 2 * kb + 1))
    f2 = tl.where(is_dense, 0, tl.load(TOFF + 2 * kb + 2))

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sdob + h * sdoh
        lse2_ptr = LSE2 + bh * S
        delta_ptr = DELTA + bh * S
        for start in range(q_lo, q_hi, BLOCK_M):  # dense queries (prefix rows, or all for dense keys)
            rows = start + offs_m
            dk, dv = dkdv_step(dk, dv, k, v, q_ptr, rows, sqs, do_ptr, rows, sdos, lse2_ptr, delta_ptr, rows,
                                rows < q_hi, offs_d, d_mask, None, False, qk_scale, 0.0, EVEN_D)
        for j in range(f0, f1):  # query blocks that see every key of this block
            qb = tl.load(TQ + j).to(tl.int64)
            rows = tl.load(QB + qb * 7) + offs_m
            q_ok = offs_m < tl.load(QB + qb * 7 + 4) * tl.load(QB + qb * 7 + 5) * tl.load(QB + qb * 7 + 6)
            dk, dv = dkdv_step(dk, dv, k, v, q_ptr, rows, sqs, do_ptr, rows, sdos, lse2_ptr, delta_ptr, rows,
                                q_ok, offs_d, d_mask, None, False, qk_scale, 0.0, EVEN_D)
        for j in range(f1, f2):  # query blocks that see part of it: element mask
            q_start, qo0, qo1, qo2, qe0, qe1, qe2 = _block_desc(QB, tl.load(TQ + j).to(tl.int64))
            rows = q_start + offs_m
            q_ok = offs_m < qe0 * qe1 * qe2
            if COORDS:
                x0, x1, x2 = _table_coords(CT, q_start - P + offs_m, q_ok, CSH0, CSH1, CM1, CM2)
            else:
                x0, x1, x2 = _coords(offs_m, qo0, qo1, qo2, qe1, qe2)
            lo0, lo1, lo2, hi0, hi1, hi2 = _query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1,
                                                          IS_BOX)
            allowed = _window_allowed(k_ok[:, None], y0[:, None], y1[:, None], y2[:, None], lo0[None, :],
                                      lo1[None, :], lo2[None, :], hi0[None, :], hi1[None, :], hi2[None, :], R,
                                      IS_BOX, AXES)
            dk, dv = dkdv_step(dk, dv, k, v, q_ptr, rows, sqs, do_ptr, rows, sdos, lse2_ptr, delta_ptr, rows,
                                q_ok, offs_d, d_mask, allowed, True, qk_scale, 0.0, EVEN_D)
    st = k_ok[:, None] & d_mask[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + rows_k[:, None] * sdks + offs_d[None, :],
             (dk * dk_scale).to(DK.dtype.element_ty), mask=st)
    tl.store(DV + b * sdvb + kvh * sdvh + rows_k[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=st)


def tuning_configs(block_m: int, block_d: int, block_n: int):
    """The (num_warps, num_stages) worth timing at these blocks: launch_configs', less the 4-warp
    ones at 128-row query blocks (sm_90a ptxas: each spills hundreds of registers inside the
    loops, tests/ops/window/test_triton_compile.py; each candidate costs a compile on first use)."""
    return [c for c in launch_configs(block_d, block_n) if c[0] >= 8 or block_m < 128]


def _prune(configs, nargs, **kw):
    arg = lambda name: kw.get(name, nargs.get(name))  # noqa: E731  (constexprs arrive as kwargs)
    allowed = tuning_configs(arg("BLOCK_M"), arg("BLOCK_D"), arg("BLOCK_N"))
    return [c for c in configs if (c.num_warps, c.num_stages) in allowed]


# On a GPU the launch configuration is tuned once per head dim, key block and window kind.
_window_fwd_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=st) for w, st in launch_configs(64) + launch_configs(256)],
    key=["D", "IS_BOX", "BLOCK_D", "BLOCK_N", "TMA"],
    prune_configs_by={"early_config_prune": _prune},
)(_window_fwd)


def default_blocks(device: torch.device, D: int, spec: WindowSpec | None = None):
    """(query block, key block) sizes: small ones in the interpreter; on a GPU, for D <= 128 (the
    larger blocks fit shared memory), 128 x 128 where the layout tiles fill 128-key blocks clearly
    better than 64-key ones (FreeSwim's (21, 3, 2) tiles: plan efficiency 0.58 -> 0.88), or where
    a box window's tiles hold whole 128-key blocks (the plan is the same at either key block; H200,
    2D box 64 x 64 on 256^2 in (8, 16) tiles: 11.4 ms at 128 x 128 against 13.6 ms at 128 x 64,
    benchmarks/RESULTS.md); else 128 x 64. DTK_WINDOW_BLOCKS="bq,bk" overrides it, for block-size
    sweeps."""
    if device.type != "cuda":
        return 16, 16
    override = _config.get("window_blocks")
    if override:
        return override
    if spec is None or D > 128:
        return 128, 64
    whole_tiles = spec.window is not None and spec.tiled and math.prod(spec.tile) % 128 == 0
    wide = whole_tiles or block_fill(spec, 128) > block_fill(spec, 64) + 0.05
    return 128, 128 if wide else 64


def block_candidates(D: int, spec: WindowSpec) -> list:
    """The (query block, key block) sizes `choose_blocks` times on a GPU: the rule's choice
    (default_blocks) first, then 128 x 64, 128 x 128 (D <= 128: shared memory) and 64 x 64."""
    rule = default_blocks(torch.device("cuda"), D, spec)
    others = [(128, 64), (128, 128), (64, 64)] if D <= 128 else [(128, 64), (64, 64)]
    return list(dict.fromkeys([rule] + others))


# (spec, q shape, kv heads, extra keys, dtype, device) -> the blocks choose_blocks measured fastest
_TUNED_BLOCKS: dict = {}


def choose_blocks(q, k, v, spec: WindowSpec, scale: float, extra_k=None, extra_v=None):
    """The engine's (query block, key block) for this problem. On a GPU with autotuning on (the
    default; DTK_TRITON_AUTOTUNE=0 and DTK_WINDOW_BLOCKS skip it), each of block_candidates runs
    on the call's own tensors the first time the problem is seen (compiles, then three timed
    runs) and the fastest is kept for the process: the plan depends on the blocks, so the launch
    autotuner, which tunes warps and stages per block size, cannot choose them. Elsewhere, and for
    a problem first seen while a CUDA graph is being captured, the rule (default_blocks)."""
    D = q.shape[3]
    if q.device.type != "cuda" or not _config.get("autotune") or _config.get("window_blocks"):
        return default_blocks(q.device, D, spec)
    key = _problem_key(q, k, spec, extra_k)
    best = _TUNED_BLOCKS.get(key)
    if best is None and torch.cuda.is_current_stream_capturing():   # nothing can be timed while capturing
        return default_blocks(q.device, D, spec)
    if best is None:
        times = {}
        for blocks in block_candidates(D, spec):
            def run():
                return window_attention_triton(q, k, v, spec, scale, extra_k, extra_v, block=blocks)
            try:
                run()
            except OutOfResources:   # a card with less shared memory
                continue
            times[blocks] = _tuning.median_ms(run, reps=3)
        best = _TUNED_BLOCKS[key] = min(times, key=times.get) if times else default_blocks(q.device, D, spec)
    return best


def _problem_key(q, k, spec: WindowSpec, extra_k):
    """What the engine's timed choices (blocks, engine) are cached under: one problem."""
    return spec, tuple(q.shape), k.shape[2], 0 if extra_k is None else extra_k.shape[1], q.dtype, q.device


def _limiting_axes(spec: WindowSpec) -> int:
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


# Whether box windows add their partial blocks' masks to the scores with small tensor-core dots
# (_box_mask_dot) where the key shape allows it, instead of testing every score (_local_allowed);
# benchmarks/window_sweep.py times both.
MASK_BY_DOT = True


def _mask_args(spec: WindowSpec, plan, qk_scale: float, device: torch.device):
    """The kernels' (mask_big, mask_floor) arguments and MASK_DOT / DEAD / MASK_F32 / KEY_SHORT
    constexprs for the blocks of the plan's key shape. The mask dots take box windows whose key
    shape spans at most 16 offsets on every limiting axis; a key shape shorter than the key block
    needs a spare offset (15) on some axis for the columns that are not keys (DEAD). The dots run
    in bf16 on a GPU (0, 1 and powers of two are exact), in fp32 in the interpreter (MASK_F32).
    mask_big * qk_scale = 2^24: masked scores end ~2^24 below the row's real maximum and 2^23
    below the floor. LOCAL: the key-shape loops at all (key blocks of at most 64, or mask dots)."""
    axes = _limiting_axes(spec)
    ext = plan.key_shape
    short = ext[0] * ext[1] * ext[2] < plan.block_k
    ok = (MASK_BY_DOT and spec.window is not None and axes != 0
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


def _window_args(spec: WindowSpec) -> tuple:
    """The kernels' window arguments: N0..2, W0..2 (1 for circles), R (1 for boxes), INWARD, PAD0,
    PAD1."""
    return (*spec.grid, *(spec.window or (1, 1, 1)), spec.radius or 1, spec.border == "inward", spec.padded(0),
            spec.padded(1))


def _geometry_args(spec: WindowSpec, device: torch.device):
    """The main kernels' window geometry arguments: _window_args, then the packed coordinate table
    CT with its shifts CSH0, CSH1 and masks CM1, CM2 (a dummy when the grid's coordinates do not
    fit 31 bits), and the COORDS constexpr."""
    ct = coord_table(spec, device)
    table = (ct.table, ct.shift0, ct.shift1, ct.mask1, ct.mask2) if ct else (torch.empty(1, dtype=torch.int32,
                                                                                        device=device), 0, 0, 0, 0)
    return (*_window_args(spec), *table), ct is not None


# The prefix (text) query rows attend to every sequence key: plain dense attention, which the
# dense kernel (cuDNN) runs at its full rate, against the Triton engine's ~60% of it (H200,
# dense-control in benchmarks/window_sweep.py). It runs on a side stream, started before the
# Triton kernel so the two overlap; False: the Triton kernel's own prefix programs (the sweep
# times both).
PREFIX_BY_DENSE = True


# Whether the forward reads the sequence's K and V blocks by tensor-memory-accelerator copies
# (Hopper and later; the layout must suit TMA, see _tma_descriptors) instead of pointer loads: the
# copies need no address registers or clamping, and are what the fastest Hopper attention kernels
# use. Off until a GPU run measures it (benchmarks/window_sweep.py times both).
TMA_LOADS = False


def _tma_descriptors(tensors, block_rows: int, block_d: int, force: bool = False):
    """(B, S, H, D) tensors as (B, H, S, D) tensor descriptors of (block_rows, block_d) tiles for
    TMA copies, or None where they do not apply: TMA_LOADS off (unless `force`), a GPU before
    Hopper, or a layout TMA cannot address (every stride but the last a multiple of 16 bytes,
    16-byte-aligned data)."""
    if not (TMA_LOADS or force) or (tensors[0].device.type == "cuda"
                                    and torch.cuda.get_device_capability(tensors[0].device)[0] < 9):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    descs = []
    for t in tensors:
        B, S, H, D = t.shape
        strides = (t.stride(0), t.stride(2), t.stride(1))
        aligned = t.data_ptr() % 16 == 0 and all(x * t.element_size() % 16 == 0 for x in strides)
        if min(B, S, H, D) == 0 or t.stride(3) != 1 or not aligned:
            return None
        descs.append(TensorDescriptor(t, [B, H, S, D], [*strides, 1], [1, 1, block_rows, block_d]))
    return descs


def _prefix_dense_ok(q, k) -> bool:
    """Whether the prefix rows go to the dense kernel: PREFIX_BY_DENSE, the kernel has not failed
    before, and it takes these tensors."""
    return PREFIX_BY_DENSE and not _dense.DENSE_FAILED and dense_supported(q, k)


def _prefix_rows_by_dense(q, k, v, out, lse, P: int, scale: float):
    """Starts rows [0, P) of (out, lse) by the dense kernel where PREFIX_BY_DENSE asks for it and
    the kernel serves (_start_prefix_dense); a failing dense kernel is said once (dense_failed)
    and not tried again. Returns (started, the side stream to join or None); not started, the
    caller's Triton kernel owes those rows."""
    if not (P and _prefix_dense_ok(q, k)):
        return False, None
    try:
        return True, _start_prefix_dense(q, k, v, out, lse, P, scale)
    except RuntimeError as e:   # a build or card without this attention
        dense_failed("dtk window_attention (prefix rows)", e)
        return False, None


def _start_prefix_dense(q, k, v, out, lse, P: int, scale: float):
    """Rows [0, P) of (out, lse) as one dense attention call over every sequence key (not the
    extra keys, which only grid queries see). On a GPU it is queued on a side stream after the
    work already on the current one (so it overlaps what is launched next), unless a CUDA graph
    is being captured; returns the stream the caller joins once its own launches are queued."""
    def run():
        o, l = dense_with_lse(q[:, :P].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        out[:, :P].copy_(o.transpose(1, 2))
        lse[:, :, :P].copy_(l)
    if not concurrent_ok(q):
        run()
        return None
    (side,) = fork_streams(q.device, 1)
    with torch.cuda.stream(side):
        run()
    return side


# Whether the forward of grid queries goes to the single-loop engine (triton_ws.py: one uniform
# loop over each 64-row query block's key blocks, which Triton warp-specializes on Hopper) where it
# applies: False never, True always, "auto" where it is faster, timed against the main engine on a
# problem's first call (as choose_blocks times block sizes). Off until a GPU run measures it (the
# benchmark's dtk-ws row, window_sweep's single-loop rows).
WS_ENGINE = False

# (problem key) -> whether the single-loop engine was faster (WS_ENGINE = "auto")
_TUNED_ENGINE: dict = {}


def _use_ws(q, k, v, spec: WindowSpec, scale: float, extra_k, extra_v) -> bool:
    """Whether this call should try the single-loop engine (see WS_ENGINE)."""
    if WS_ENGINE is True:
        return True
    if WS_ENGINE != "auto" or q.device.type != "cuda" or not _config.get("autotune"):
        return False
    key = _problem_key(q, k, spec, extra_k)
    faster = _TUNED_ENGINE.get(key)
    if faster is None:
        if torch.cuda.is_current_stream_capturing():   # nothing can be timed while capturing
            return False
        blocks = choose_blocks(q, k, v, spec, scale, extra_k, extra_v)

        def main():
            return window_attention_triton(q, k, v, spec, scale, extra_k, extra_v, block=blocks)

        def single_loop():
            return _ws_forward(q, k, v, spec, scale, extra_k)
        faster = _TUNED_ENGINE[key] = (single_loop() is not None   # applies (and is compiled)
                                       and _tuning.median_ms(single_loop, reps=3) < _tuning.median_ms(main, reps=3))
    return faster


def _ws_setup(q, k, v, spec: WindowSpec, extra_k):
    """The single-loop engine's launch inputs (plan, entries, counts, q / kv descriptors, key
    block, head-dim block), or None where it does not apply: extra keys, a GPU before Hopper, head
    dims over 128, a layout TMA cannot address, edge tiles with partial blocks of another shape,
    or prefix rows the dense kernel cannot take (checked without running anything)."""
    from . import triton_ws as ws
    D = q.shape[3]
    block_d = max(16, triton.next_power_of_2(D))
    if extra_k is not None or block_d > 128:
        return None
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        return None
    if spec.num_prefix and not _prefix_dense_ok(q, k):
        return None
    block_k = ws.BLOCK_K if q.device.type == "cuda" else default_blocks(q.device, D, spec)[1]
    kv = _tma_descriptors((k, v), block_k, block_d, force=True)
    qd = _tma_descriptors((q,), ws.BLOCK_Q, block_d, force=True)
    built = ws.ws_plan(spec, block_k, q.device)
    if kv is None or qd is None or built is None:
        return None
    return (*built, qd, kv, block_k, block_d)


def _ws_forward(q, k, v, spec: WindowSpec, scale: float, extra_k):
    """(out, lse) by the single-loop engine, or None where it does not apply (_ws_setup) or the
    prefix rows' dense kernel fails on this call."""
    from . import triton_ws as ws
    setup = _ws_setup(q, k, v, spec, extra_k)
    if setup is None:
        return None
    plan, entries, counts, qd, kv, block_k, block_d = setup
    B, S, H, D = q.shape
    P = spec.num_prefix
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    by_dense, side = _prefix_rows_by_dense(q, k, v, out, lse, P, scale)
    if P and not by_dense:   # the dense kernel failed just now: the main engine's prefix programs
        return None
    if plan.num_blocks * B * H:
        gpu = q.device.type == "cuda"
        ws._window_fwd_ws[(plan.num_blocks * B * H,)](
            *qd, out, lse, *kv, plan.q_blocks, entries, counts, plan.order,
            out.stride(0), out.stride(1), out.stride(2),
            H, H // k.shape[2], S, plan.num_blocks, entries.shape[1], D, plan.key_shape[1], plan.key_shape[2],
            *_window_args(spec), scale * LOG2E,
            IS_BOX=spec.window is not None, BLOCK_M=ws.BLOCK_Q, BLOCK_N=block_k, BLOCK_D=block_d,
            AXES=_limiting_axes(spec), WS=gpu,
            num_warps=ws.NUM_WARPS if gpu else 4, num_stages=ws.NUM_STAGES if gpu else 1)
    if side is not None:
        join_streams([side])
    return out, lse


def window_attention_triton(q, k, v, spec: WindowSpec, scale: float, extra_k=None, extra_v=None, block=None,
                            launch=None):
    """Runs the Triton engine (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). `block`
    is (block_q, block_k) or one int for both; default `choose_blocks`. `launch` = (num_warps,
    num_stages) fixes the launch configuration (no autotuning; benchmarks/window_sweep.py)."""
    if launch is not None and not (len(launch) == 2 and all(isinstance(x, int) and x >= 1 for x in launch)):
        raise ValueError(f"launch must be (num_warps, num_stages), two ints >= 1, got {launch!r}")
    if block is None and launch is None and _use_ws(q, k, v, spec, scale, extra_k, extra_v):
        res = _ws_forward(q, k, v, spec, scale, extra_k)
        if res is not None:
            return res
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    if block is None:
        block = default_blocks(q.device, D, spec) if launch else choose_blocks(q, k, v, spec, scale, extra_k, extra_v)
    block_q, block_k = (block, block) if isinstance(block, int) else block
    plan = build_plan(spec, block_q, block_k, q.device)
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    E = 0 if extra_k is None else extra_k.shape[1]
    ek, ev = (k, v) if extra_k is None else (extra_k, extra_v)
    P = spec.num_prefix
    by_dense, side = _prefix_rows_by_dense(q, k, v, out, lse, P, scale)
    n_pqb = 0 if by_dense else (P + block_q - 1) // block_q   # by_dense: the grid query blocks only
    block_d = max(16, triton.next_power_of_2(D))
    grid = ((n_pqb + plan.num_blocks) * B * H,)
    tuned = q.device.type == "cuda" and _config.get("autotune") and launch is None
    kernel = _window_fwd_tuned if tuned else _window_fwd
    warps, stages = launch or launch_configs(block_d, block_k)[0]
    config = {} if tuned else dict(num_warps=warps if block_q >= 64 or launch else 4, num_stages=stages)
    geometry, coords = _geometry_args(spec, q.device)
    mask_vals, mask_flags = _mask_args(spec, plan, scale * LOG2E, q.device)
    descs = _tma_descriptors((k, v), block_k, block_d)
    kernel[grid](
        q, k, v, ek, ev, out, lse, plan.q_blocks, plan.entries, plan.kv_count, plan.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ek.stride(0), ek.stride(1), ek.stride(2),
        ev.stride(0), ev.stride(1), ev.stride(2), out.stride(0), out.stride(1), out.stride(2),
        B, H, H // Hkv, S, P, E, plan.max_entries, n_pqb, plan.num_blocks, D, *plan.key_shape, *mask_vals,
        *geometry, scale * LOG2E,
        q, lse, lse, 0, 0, 0, 1.0,  # the backward's inputs (DO, LSE2, DELTA): unused here
        *(descs or (k, v)),
        IS_BOX=spec.window is not None, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, EVEN_D=block_d == D,
        AXES=_limiting_axes(spec), COORDS=coords, TMA=descs is not None, **mask_flags,
        **config,
    )
    if side is not None:
        join_streams([side])
    return out, lse


def window_attention_backward_triton(grad_out, grad_lse, q, k, v, out, lse, spec: WindowSpec, scale: float,
                                     extra_k=None, extra_v=None, block=None):
    """(dq, dk, dv, d_extra_k, d_extra_v) of window_attention_triton's (out, lse); grad_lse may be
    None. Three launches (four with extra keys): per-row delta and lse, dq, dk/dv."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    block = block or backward_block(q.device)
    kplan = build_key_plan(spec, block, q.device)
    plan = kplan.plan
    P = spec.num_prefix
    E = 0 if extra_k is None else extra_k.shape[1]
    block_d = max(16, triton.next_power_of_2(D))
    geometry, coords = _geometry_args(spec, q.device)
    consts = dict(IS_BOX=spec.window is not None, BLOCK_D=block_d, EVEN_D=block_d == D, AXES=_limiting_axes(spec),
                  COORDS=coords)
    dq_launch, dkdv_launch = backward_launch_configs(block_d) if q.device.type == "cuda" else ((4, 1), (4, 1))

    lse2, delta = backward_row_stats(out, grad_out, lse, grad_lse)

    dq = new_output((B, S, H, D), like=q)
    ek, ev = (k, v) if extra_k is None else (extra_k, extra_v)
    n_pqb = triton.cdiv(P, block)
    mask_vals, mask_flags = _mask_args(spec, plan, scale * LOG2E, q.device)
    _window_fwd[((n_pqb + plan.num_blocks) * B * H,)](
        q, k, v, ek, ev, dq, lse, plan.q_blocks, plan.entries, plan.kv_count, plan.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ek.stride(0), ek.stride(1), ek.stride(2),
        ev.stride(0), ev.stride(1), ev.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        B, H, H // Hkv, S, P, E, plan.max_entries, n_pqb, plan.num_blocks, D, *plan.key_shape, *mask_vals,
        *geometry, scale * LOG2E,
        grad_out, lse2, delta, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), scale, k, v,
        BLOCK_M=block, BLOCK_N=block, BWD=True, **mask_flags, **consts, num_warps=dq_launch[0],
        num_stages=dq_launch[1])

    dk, dv = new_output(k.shape, like=k), new_output(v.shape, like=v)
    dek = new_output((B, E, Hkv, D), like=k)
    dev = new_output((B, E, Hkv, D), like=v)

    def dkdv(kk, vv, dkk, dvv, n_dense, dense_q, n_grid):
        ndb = triton.cdiv(n_dense, block)
        _window_bwd_dkdv[((ndb + n_grid) * B * Hkv,)](
            q, kk, vv, grad_out, lse2, delta, dkk, dvv, plan.q_blocks, kplan.queries, kplan.offsets,
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            vv.stride(0), vv.stride(1), vv.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dkk.stride(0), dkk.stride(1), dkk.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2),
            B, H, H // Hkv, S, P, ndb, n_dense, dense_q[0], dense_q[1], n_grid, D, *geometry,
            scale * LOG2E, scale, BLOCK_M=block, BLOCK_N=block, **consts, num_warps=dkdv_launch[0],
            num_stages=dkdv_launch[1])

    dkdv(k, v, dk, dv, P, (0, S), plan.num_blocks)      # prefix keys (seen by all), grid keys
    if E:
        dkdv(extra_k, extra_v, dek, dev, E, (P, S), 0)  # extra keys (seen by the grid queries)
    return dq, dk, dv, dek, dev
