"""The main Triton engine of window attention, forward: one program per (query block, batch x
head) walks the plan's key blocks with an online softmax; element masks are evaluated only on
partial blocks. The blocks of the plan's key shape (interior tiles) take their keys' offsets from
the block origin, computed once per program, and box windows may add their masks on the tensor
cores (box_mask_dot); the other blocks (edge tiles) read grid coordinates from a packed per-token
table (plan.coord_table). Scores stay raw until the exponent, where one FMA applies the scale (log2
units). Prefix (global) queries and keys and the extra keys are dense ranges around the plan; the
caller may have the prefix query rows computed elsewhere (the dense kernel, prefix.py) and then
launches the grid query blocks only.

The same kernel with BWD=True is the backward's dq pass (triton_backward.py). The launcher takes
every choice as an argument (blocks, launch configuration, mask variant, whether the prefix rows
are its own); engine.py makes those choices (docs/architecture.md, "Engines and configuration")."""
from __future__ import annotations

import triton
import triton.language as tl

from .._attention.triton import (LOG2E, dense_range, fold, head_indices, key_rows, launch_configs, load_rows,
                                 row_state, step, tile_offsets, write_rows)
from .plan import build_plan
from .spec import WindowSpec
from .triton_geometry import (GEOMETRY_ARGS, block_desc, box_mask_dot, coords, dead_mask_dot, geometry_args,
                              limiting_axes, local_allowed, local_offsets, mask_args, onehot, query_windows,
                              table_coords, unpack_offsets, window_allowed)


@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["E", "L", "N_PQB", "NQB", "KE0", "KE1", "KE2"])
def _window_fwd(
    Q, K, V, EK, EV, O, LSE, QB, ENT, CNT, ORDER,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    sekb, seks, sekh, sevb, sevs, sevh, sob, sos, soh,
    B, H, GROUP, S, P, E, L, N_PQB, NQB, D, KE0, KE1, KE2, mask_big, mask_floor,
    N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, CT, CSH0, CSH1, CM1, CM2,
    qk_scale,
    DO, LSE2, DELTA, sdob, sdos, sdoh, dq_scale,
    IS_BOX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, AXES: tl.constexpr, COORDS: tl.constexpr, KEY_SHORT: tl.constexpr,
    MASK_DOT: tl.constexpr, DEAD: tl.constexpr, MASK_F32: tl.constexpr, LOCAL: tl.constexpr,
    BWD: tl.constexpr = False,
):
    # The forward, or with BWD the dq pass of the backward (same walk over the keys; O is dq, DO
    # the output gradient, LSE2 / DELTA the rows' lse (log2 units) and delta, see step).
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
    q_start, qo0, qo1, qo2, qe0, qe1, qe2 = block_desc(QB, qb)
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
                                 qk_scale, offs_n, offs_d, d_mask, BLOCK_N, BWD)
    # Per-query window geometry, computed once: box bounds or circle centres per axis.
    x0, x1, x2 = coords(offs_m, qo0, qo1, qo2, qe1, qe2)
    lo0, lo1, lo2, hi0, hi1, hi2 = query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, IS_BOX)
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
        k = key_rows(k_ptr, rows, sks, offs_d, d_mask, EVEN_D)
        v = key_rows(v_ptr, rows, svs, offs_d, d_mask, EVEN_D)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, None, False, qk_scale, BWD)
    # Blocks of the plan's key shape (KE0, KE1, KE2): a key's offsets from its block's origin depend
    # only on its column, so they are computed once (packed), and the columns past the shape's keys
    # (when it holds fewer than BLOCK_N) are the same in every such block. Boxes with MASK_DOT add
    # masks to the scores on the tensor cores (box_mask_dot); the others test the scores. Without
    # LOCAL (wide key blocks tested per score: their per-column offsets would spill registers) these
    # blocks take the general loops below.
    short_lo = c0
    odd_lo = c2
    if LOCAL:
        lp = local_offsets(offs_n, KE1, KE2)
        if MASK_DOT:
            l0, l1, l2 = unpack_offsets(lp)
            alive = l0 < KE0
            oh0 = onehot(l0, alive, DEAD == 0, MASK_F32)
            oh1 = onehot(l1, alive, DEAD == 1, MASK_F32)
            oh2 = onehot(l2, alive, DEAD == 2, MASK_F32)
        for j in range(c0, c1):  # full blocks of the key shape, shorter than BLOCK_N: mask its missing keys
            e = ent_ptr + j * 8
            start = tl.load(e)
            rows = tl.minimum(start + offs_n, last).to(tl.int64)
            k = key_rows(k_ptr, rows, sks, offs_d, d_mask, EVEN_D)
            v = key_rows(v_ptr, rows, svs, offs_d, d_mask, EVEN_D)
            if MASK_DOT:
                s = dead_mask_dot(tl.dot(q, tl.trans(k)), oh0, oh1, oh2, mask_big, DEAD, MASK_F32, BLOCK_M)
                acc, m_i, l_i = fold(s, do, acc, m_i, l_i, k, v, qk_scale, mask_floor, True, BWD)
            else:
                acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, ((lp >> 20) < KE0)[None, :], True, qk_scale, BWD)
        short_lo = c1
    for j in range(short_lo, c2):  # the other full but shorter key blocks: mask the missing columns only
        e = ent_ptr + j * 8
        n_ok = offs_n < tl.load(e + 4) * tl.load(e + 5) * tl.load(e + 6)
        start = tl.load(e)
        rows = tl.minimum(start + offs_n, last).to(tl.int64)
        k = key_rows(k_ptr, rows, sks, offs_d, d_mask, EVEN_D)
        v = key_rows(v_ptr, rows, svs, offs_d, d_mask, EVEN_D)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, n_ok[None, :], True, qk_scale, BWD)
    if LOCAL:
        sp0, sp1, sp2 = hi0 - lo0, hi1 - lo1, hi2 - lo2
        for j in range(c2, c3):  # partial blocks of the key shape: the window tested relative to its origin
            e = ent_ptr + j * 8
            start = tl.load(e)
            rows = tl.minimum(start + offs_n, last).to(tl.int64)
            k = key_rows(k_ptr, rows, sks, offs_d, d_mask, EVEN_D)
            v = key_rows(v_ptr, rows, svs, offs_d, d_mask, EVEN_D)
            r0, r1, r2 = lo0 - tl.load(e + 1), lo1 - tl.load(e + 2), lo2 - tl.load(e + 3)
            if MASK_DOT:
                s = tl.dot(q, tl.trans(k))
                if AXES & 1 or DEAD == 0:
                    s = box_mask_dot(s, oh0, r0, r0 + sp0, mask_big, AXES & 1, DEAD == 0, MASK_F32)
                if AXES & 2 or DEAD == 1:
                    s = box_mask_dot(s, oh1, r1, r1 + sp1, mask_big, AXES & 2, DEAD == 1, MASK_F32)
                if AXES & 4 or DEAD == 2:
                    s = box_mask_dot(s, oh2, r2, r2 + sp2, mask_big, AXES & 4, DEAD == 2, MASK_F32)
                acc, m_i, l_i = fold(s, do, acc, m_i, l_i, k, v, qk_scale, mask_floor, True, BWD)
            else:
                allowed = local_allowed(lp, KE0, r0, r1, r2, sp0, sp1, sp2, R, IS_BOX, AXES, KEY_SHORT)
                acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, allowed, True, qk_scale, BWD)
        odd_lo = c3
    for j in range(odd_lo, c4):  # the other partial key blocks (edge tiles): element mask from coordinates
        e = ent_ptr + j * 8
        ke1 = tl.load(e + 5)
        ke2 = tl.load(e + 6)
        n_ok = offs_n < tl.load(e + 4) * ke1 * ke2
        start = tl.load(e)
        rows = tl.minimum(start + offs_n, last).to(tl.int64)
        k = key_rows(k_ptr, rows, sks, offs_d, d_mask, EVEN_D)
        v = key_rows(v_ptr, rows, svs, offs_d, d_mask, EVEN_D)
        if COORDS:
            y0, y1, y2 = table_coords(CT, start - P + offs_n, n_ok, CSH0, CSH1, CM1, CM2)
        else:
            y0, y1, y2 = coords(offs_n, tl.load(e + 1), tl.load(e + 2), tl.load(e + 3), ke1, ke2)
        allowed = window_allowed(n_ok[None, :], y0[None, :], y1[None, :], y2[None, :], lo0[:, None], lo1[:, None],
                                  lo2[:, None], hi0[:, None], hi1[:, None], hi2[:, None], R, IS_BOX, AXES)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, allowed, True, qk_scale, BWD)
    acc, m_i, l_i = dense_range(q, do, acc, m_i, l_i, EK + b * sekb + kvh * sekh, EV + b * sevb + kvh * sevh,
                                 seks, sevs, 0, tl.where(is_prefix, 0, E), qk_scale, offs_n, offs_d, d_mask,
                                 BLOCK_N, BWD)

    write_rows(O + b * sob + h * soh + rows_q[:, None] * sos + offs_d[None, :], LSE + bh.to(tl.int64) * S + rows_q,
                acc, m_i, l_i, q_ok, d_mask, dq_scale, BWD)


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
    key=["D", "IS_BOX", "BLOCK_D", "BLOCK_N"],
    prune_configs_by={"early_config_prune": _prune},
)(_window_fwd)



def window_forward(q, k, v, spec: WindowSpec, scale: float, extra_k, extra_v, out, lse, *, block, launch,
                   mask_by_dot: bool, prefix_rows: bool):
    """Writes (out, lse) of the window attention of q, k, v (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1) at `block` = (block_q, block_k). `launch` = (num_warps, num_stages), or
    None for the launch autotuner (a GPU). `mask_by_dot`: box windows' partial blocks masked by
    tensor-core dots where the key shape allows it (else tested per score). `prefix_rows`: the
    kernel computes the prefix query rows too; False: only the grid query rows (the caller has
    the prefix rows computed)."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    block_q, block_k = block
    plan = build_plan(spec, block_q, block_k, q.device)
    E = 0 if extra_k is None else extra_k.shape[1]
    ek, ev = (k, v) if extra_k is None else (extra_k, extra_v)
    P = spec.num_prefix
    n_pqb = (P + block_q - 1) // block_q if prefix_rows else 0
    block_d = max(16, triton.next_power_of_2(D))
    grid = ((n_pqb + plan.num_blocks) * B * H,)
    kernel = _window_fwd_tuned if launch is None else _window_fwd
    config = {} if launch is None else dict(num_warps=launch[0], num_stages=launch[1])
    geometry, has_table = geometry_args(spec, q.device)
    mask_vals, mask_flags = mask_args(spec, plan, scale * LOG2E, q.device, mask_by_dot)
    kernel[grid](
        q, k, v, ek, ev, out, lse, plan.q_blocks, plan.entries, plan.kv_count, plan.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ek.stride(0), ek.stride(1), ek.stride(2),
        ev.stride(0), ev.stride(1), ev.stride(2), out.stride(0), out.stride(1), out.stride(2),
        B, H, H // Hkv, S, P, E, plan.max_entries, n_pqb, plan.num_blocks, D, *plan.key_shape, *mask_vals,
        *geometry, scale * LOG2E,
        q, lse, lse, 0, 0, 0, 1.0,  # the backward's inputs (DO, LSE2, DELTA): unused here
        IS_BOX=spec.window is not None, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, EVEN_D=block_d == D,
        AXES=limiting_axes(spec), COORDS=has_table, **mask_flags, **config,
    )
    return out, lse
