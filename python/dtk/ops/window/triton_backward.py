"""The main Triton engine of window attention, backward (FlashAttention-2 style, from the
forward's lse): the forward's query-side walk computes dq (triton.py's kernel with BWD=True), and
`_window_bwd_dkdv` walks the transposed plan (per key block, the query blocks that see it) for dk
and dv, looping over the GQA group's q heads. The launcher takes its blocks, launch
configurations and mask variant as arguments (engine.py chooses them)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..._debug import new_output
from .._attention.triton import LOG2E, backward_row_stats, dkdv_step, kv_head_indices, load_rows, tile_offsets
from .plan import build_key_plan
from .spec import WindowSpec
from .triton import _window_fwd
from .triton_geometry import (GEOMETRY_ARGS, block_desc, coords, geometry_args, limiting_axes, mask_args,
                              query_windows, table_coords, window_allowed)


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
    k_start, ko0, ko1, ko2, ke0, ke1, ke2 = block_desc(QB, kb)
    k_start = tl.where(is_dense, pid * BLOCK_N, k_start)
    k_len = tl.where(is_dense, tl.minimum(DENSE_LEN - pid * BLOCK_N, BLOCK_N), ke0 * ke1 * ke2)
    rows_k = (k_start + offs_n).to(tl.int64)
    k_ok = offs_n < k_len
    k = load_rows(K + b * skb + kvh * skh, rows_k, sks, offs_d, k_ok, d_mask, True, EVEN_D)
    v = load_rows(V + b * svb + kvh * svh, rows_k, svs, offs_d, k_ok, d_mask, True, EVEN_D)
    y0, y1, y2 = coords(offs_n, ko0, ko1, ko2, ke1, ke2)
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
            q_start, qo0, qo1, qo2, qe0, qe1, qe2 = block_desc(QB, tl.load(TQ + j).to(tl.int64))
            rows = q_start + offs_m
            q_ok = offs_m < qe0 * qe1 * qe2
            if COORDS:
                x0, x1, x2 = table_coords(CT, q_start - P + offs_m, q_ok, CSH0, CSH1, CM1, CM2)
            else:
                x0, x1, x2 = coords(offs_m, qo0, qo1, qo2, qe1, qe2)
            lo0, lo1, lo2, hi0, hi1, hi2 = query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1,
                                                          IS_BOX)
            allowed = window_allowed(k_ok[:, None], y0[:, None], y1[:, None], y2[:, None], lo0[None, :],
                                      lo1[None, :], lo2[None, :], hi0[None, :], hi1[None, :], hi2[None, :], R,
                                      IS_BOX, AXES)
            dk, dv = dkdv_step(dk, dv, k, v, q_ptr, rows, sqs, do_ptr, rows, sdos, lse2_ptr, delta_ptr, rows,
                                q_ok, offs_d, d_mask, allowed, True, qk_scale, 0.0, EVEN_D)
    st = k_ok[:, None] & d_mask[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + rows_k[:, None] * sdks + offs_d[None, :],
             (dk * dk_scale).to(DK.dtype.element_ty), mask=st)
    tl.store(DV + b * sdvb + kvh * sdvh + rows_k[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=st)


def window_backward(grad_out, grad_lse, q, k, v, out, lse, spec: WindowSpec, scale: float, extra_k, extra_v, *,
                    block: int, dq_launch, dkdv_launch, mask_by_dot: bool):
    """(dq, dk, dv, d_extra_k, d_extra_v) of the window forward's (out, lse); grad_lse may be None.
    `block`: the query and key block (equal: the dk/dv pass walks the plan transposed);
    `dq_launch`, `dkdv_launch`: (num_warps, num_stages) of the two passes; `mask_by_dot`: as the
    forward's. Three launches (four with extra keys): per-row delta and lse, dq, dk/dv."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    kplan = build_key_plan(spec, block, q.device)
    plan = kplan.plan
    P = spec.num_prefix
    E = 0 if extra_k is None else extra_k.shape[1]
    block_d = max(16, triton.next_power_of_2(D))
    geometry, has_table = geometry_args(spec, q.device)
    consts = dict(IS_BOX=spec.window is not None, BLOCK_D=block_d, EVEN_D=block_d == D, AXES=limiting_axes(spec),
                  COORDS=has_table)

    lse2, delta = backward_row_stats(out, grad_out, lse, grad_lse)

    dq = new_output((B, S, H, D), like=q)
    ek, ev = (k, v) if extra_k is None else (extra_k, extra_v)
    n_pqb = triton.cdiv(P, block)
    mask_vals, mask_flags = mask_args(spec, plan, scale * LOG2E, q.device, mask_by_dot)
    _window_fwd[((n_pqb + plan.num_blocks) * B * H,)](
        q, k, v, ek, ev, dq, lse, plan.q_blocks, plan.entries, plan.kv_count, plan.order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ek.stride(0), ek.stride(1), ek.stride(2),
        ev.stride(0), ev.stride(1), ev.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        B, H, H // Hkv, S, P, E, plan.max_entries, n_pqb, plan.num_blocks, D, *plan.key_shape, *mask_vals,
        *geometry, scale * LOG2E,
        grad_out, lse2, delta, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), scale,
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
