"""Triton engine of the sparse-token family: more plans for the window engine (same jit helpers).

multi_kv_attention: one program per (query block, batch x head); it gathers its query rows itself
(q_index), then visits up to MAX_SEGMENTS K/V segments in turn with one shared online-softmax
state (no concatenation); a segment's keys are a dense range, or a gathered subset (kv_index).
Results go to a compact (B, n, H, D) output, or are scattered into `out` in place. More segments
are processed in groups of MAX_SEGMENTS whose partial results merge exactly through the lse.

segment_attention: one program per (query block, batch x head); each row knows its branch; the
program visits only the key branches some of its rows may see (a whole masked branch is skipped,
never computed), with a per-row mask/bias only where the block straddles branches.

Backward (both ops, from the forward's lse): the forward kernels with BWD=True compute dq over the
same key walk (step), and one dk/dv kernel per op walks, per key block, every query that sees it
(dkdv_step, shared with the window engine). Gathered rows (q_index, kv_index) go through compact
float32 buffers that are scatter-added back (repeated indices add up)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output
from .._attention.triton import (LOG2E, backward_block, backward_launch_configs, backward_row_stats, dense_range,
                                 default_blocks, dkdv_step, finish, fold, head_indices, kv_head_indices, launch_configs,
                                 load_rows, row_state, step, tile_offsets, write_rows)

MAX_SEGMENTS = 4


@triton.jit
def _step_bias(q, do, acc, m_i, l_i, k, v, qk_mask, bias, qk_scale, BWD: tl.constexpr):
    """step with a per-row additive bias (log2 units) and an element mask."""
    s = tl.dot(q, tl.trans(k)) + (bias / qk_scale)[:, None]   # raw units: scaled in the exponent
    s = tl.where(qk_mask, s, float("-inf"))
    return fold(s, do, acc, m_i, l_i, k, v, qk_scale, 0.0, False, BWD)


@triton.jit
def _gather_rows(idx_ptr, n, M, L, HAS_IDX: tl.constexpr):
    """(rows, ok) of entries n of a row list of M entries over L rows: the index entries (kv_index,
    q_index; -1 or out of range = padding, ok False) or the positions themselves."""
    n_ok = n < M
    if HAS_IDX:
        rows = tl.load(idx_ptr + n, mask=n_ok, other=-1).to(tl.int64)
        n_ok = n_ok & (rows >= 0) & (rows < L)
        rows = tl.where(n_ok, rows, 0)
    else:
        rows = n.to(tl.int64)
    return rows, n_ok


@triton.jit
def _kv_segment(q, do, acc, m_i, l_i, k_ptr, v_ptr, sk, sv, idx_ptr, L, M, active, qk_scale,
                offs_n, offs_d, d_mask, HAS_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BWD: tl.constexpr):
    """Attend to one segment: keys [0, L), or the M keys idx_ptr[0..M) (-1 = padding)."""
    hi = tl.where(active, M, 0)
    if HAS_IDX:
        for start in range(0, hi, BLOCK_N):
            rows, n_ok = _gather_rows(idx_ptr, start + offs_n, hi, L, True)
            k = load_rows(k_ptr, rows, sk, offs_d, n_ok, d_mask, True, False)
            v = load_rows(v_ptr, rows, sv, offs_d, n_ok, d_mask, True, False)
            acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, n_ok[None, :], True, qk_scale, BWD)
    else:
        acc, m_i, l_i = dense_range(q, do, acc, m_i, l_i, k_ptr, v_ptr, sk, sv, 0, hi, qk_scale,
                                     offs_n, offs_d, d_mask, BLOCK_N, BWD)
    return acc, m_i, l_i


@triton.jit
def _mkv_fwd(
    Q, QI, O, LSE,
    K0, V0, I0, sk0b, sk0s, sk0h, sv0b, sv0s, sv0h, si0b, L0, M0,
    K1, V1, I1, sk1b, sk1s, sk1h, sv1b, sv1s, sv1h, si1b, L1, M1,
    K2, V2, I2, sk2b, sk2s, sk2h, sv2b, sv2s, sv2h, si2b, L2, M2,
    K3, V3, I3, sk3b, sk3s, sk3h, sv3b, sv3s, sv3h, si3b, L3, M3,
    sqb, sqs, sqh, sqib, sob, sos, soh,
    H, GROUP, SQ, NQ, D, qk_scale,
    DO, LSE2, DELTA, sdob, sdos, sdoh, dq_scale,
    NSEG: tl.constexpr, HI0: tl.constexpr, HI1: tl.constexpr, HI2: tl.constexpr, HI3: tl.constexpr,
    HAS_QI: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BWD: tl.constexpr = False,
):
    # The forward, or with BWD the dq pass of the backward: O is then the compact (B, n, H, D) dq,
    # DO the output gradient, LSE2 / DELTA the rows' lse (log2 units) and delta (see step).
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kvh = head_indices(bh, H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    m_idx = pid.to(tl.int64) * BLOCK_M + offs_m
    m_ok = m_idx < NQ
    rows_q, q_ok = _gather_rows(QI + b * sqib, m_idx, NQ, SQ, HAS_QI)  # the kernel gathers its query rows
    active = tl.max(q_ok.to(tl.int32), 0) > 0      # all-padding blocks skip every key
    q = tl.load(Q + b * sqb + h * sqh + rows_q[:, None] * sqs + offs_d[None, :],
                mask=q_ok[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stats = bh.to(tl.int64) * NQ
    do, m_i, l_i = row_state(q, DO + b * sdob + h * sdoh, m_idx, sdos, LSE2 + stats, DELTA + stats, m_idx, q_ok,
                              offs_d, d_mask, BLOCK_M, False, BWD)

    acc, m_i, l_i = _kv_segment(q, do, acc, m_i, l_i, K0 + b * sk0b + kvh * sk0h, V0 + b * sv0b + kvh * sv0h,
                                sk0s, sv0s, I0 + b * si0b, L0, M0, active, qk_scale, offs_n, offs_d, d_mask,
                                HI0, BLOCK_N, BWD)
    if NSEG > 1:
        acc, m_i, l_i = _kv_segment(q, do, acc, m_i, l_i, K1 + b * sk1b + kvh * sk1h, V1 + b * sv1b + kvh * sv1h,
                                    sk1s, sv1s, I1 + b * si1b, L1, M1, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI1, BLOCK_N, BWD)
    if NSEG > 2:
        acc, m_i, l_i = _kv_segment(q, do, acc, m_i, l_i, K2 + b * sk2b + kvh * sk2h, V2 + b * sv2b + kvh * sv2h,
                                    sk2s, sv2s, I2 + b * si2b, L2, M2, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI2, BLOCK_N, BWD)
    if NSEG > 3:
        acc, m_i, l_i = _kv_segment(q, do, acc, m_i, l_i, K3 + b * sk3b + kvh * sk3h, V3 + b * sv3b + kvh * sv3h,
                                    sk3s, sv3s, I3 + b * si3b, L3, M3, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI3, BLOCK_N, BWD)

    if BWD:
        tl.store(O + b * sob + h * soh + m_idx[:, None] * sos + offs_d[None, :],
                 (acc * dq_scale).to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])
    else:
        out, lse = finish(acc, m_i, l_i)
        out = tl.where(q_ok[:, None], out, 0.0)
        lse = tl.where(q_ok, lse, float("-inf"))
        if SCATTER:
            tl.store(O + b * sob + h * soh + rows_q[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=q_ok[:, None] & d_mask[None, :])
        else:
            tl.store(O + b * sob + h * soh + m_idx[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=m_ok[:, None] & d_mask[None, :])
        tl.store(LSE + bh.to(tl.int64) * NQ + m_idx, lse, mask=m_ok)


def _launch_cfg(q, D, block):
    if block is None:
        block = default_blocks(q.device)
    block_q, block_k = (block, block) if isinstance(block, int) else block
    block_d = max(16, triton.next_power_of_2(D))
    w, st = launch_configs(block_d, block_k)[0]
    return block_q, block_k, block_d, dict(num_warps=w if block_q >= 64 else 4, num_stages=st)


def _mkv_launch(q, ks, vs, kv_index, q_index, qk_scale, o, lse, scatter, block, bwd=None):
    """One _mkv_fwd launch over up to MAX_SEGMENTS segments; with bwd = (grad_out, lse2, delta,
    scale) the dq pass into the compact o (lse unused)."""
    B, SQ, H, D = q.shape
    NQ = o.shape[1] if bwd is not None else lse.shape[2]
    Hkv = ks[0].shape[2]
    block_q, block_k, block_d, cfg = _launch_cfg(q, D, block)
    if bwd is not None:
        w, st = backward_launch_configs(block_d)[0]
        cfg = dict(num_warps=w, num_stages=st) if q.device.type == "cuda" else cfg
    nseg = len(ks)
    seg_args, has_idx = [], []
    for i in range(MAX_SEGMENTS):
        j = min(i, nseg - 1)          # unused slots repeat the last segment (never read: NSEG)
        k, v, idx = ks[j], vs[j], kv_index[j]
        if idx is None:
            ip, sib, M = k, 0, k.shape[1]
        else:
            ip = idx if idx.stride(-1) == 1 else idx.contiguous()
            sib = 0 if ip.dim() == 1 else ip.stride(0)
            M = ip.shape[-1]
        seg_args += [k, v, ip, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                     sib, k.shape[1], M]
        has_idx.append(idx is not None)
    qi = q_index if q_index is not None else lse
    sqib = 0 if q_index is None else q_index.stride(0)
    grid = (triton.cdiv(NQ, block_q), B * H)
    if NQ == 0 or B * H == 0:
        return
    g, lse2, delta, dq_scale = bwd if bwd is not None else (q, lse, lse, 1.0)
    _mkv_fwd[grid](
        q, qi, o, lse, *seg_args,
        q.stride(0), q.stride(1), q.stride(2), sqib, o.stride(0), o.stride(1), o.stride(2),
        H, H // Hkv, SQ, NQ, D, qk_scale,
        g, lse2, delta, g.stride(0), g.stride(1), g.stride(2), dq_scale,
        NSEG=nseg, HI0=has_idx[0], HI1=has_idx[1], HI2=has_idx[2], HI3=has_idx[3],
        HAS_QI=q_index is not None, SCATTER=scatter,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, BWD=bwd is not None, **cfg)


def _prep_index(idx):
    if idx is None:
        return None
    return idx if idx.stride(-1) == 1 else idx.contiguous()


def multi_kv_attention_triton(q, ks, vs, kv_index, q_index, scale, out=None, block=None):
    """(out, lse). Without `out`: out is (B, n, H, D) (n = q_index width, or S_q). With `out`
    (needs q_index): results are scattered into out's q_index rows in place; returns (out, lse)."""
    B, SQ, H, D = q.shape
    ks, vs = list(ks), list(vs)
    kv_index = [_prep_index(i) for i in (kv_index if kv_index else [None] * len(ks))]
    q_index = _prep_index(q_index)
    NQ = SQ if q_index is None else q_index.shape[1]
    lse = new_output((B, H, NQ), like=q, dtype=torch.float32)
    qk_scale = scale * LOG2E
    if len(ks) <= MAX_SEGMENTS:
        if out is not None:
            _mkv_launch(q, ks, vs, kv_index, q_index, qk_scale, out, lse, True, block)
            return out, lse
        o = new_output((B, NQ, H, D), like=q)
        _mkv_launch(q, ks, vs, kv_index, q_index, qk_scale, o, lse, False, block)
        return o, lse
    # More segments: groups of MAX_SEGMENTS into float32 partials, merged exactly through their lse.
    from .merge import merge_partials

    parts, lses = [], []
    for g in range(0, len(ks), MAX_SEGMENTS):
        sl = slice(g, g + MAX_SEGMENTS)
        o = new_output((B, NQ, H, D), like=q, dtype=torch.float32)
        l = new_output((B, H, NQ), like=q, dtype=torch.float32)
        _mkv_launch(q, ks[sl], vs[sl], kv_index[sl], q_index, qk_scale, o, l, False, block)
        parts.append(o.transpose(1, 2))
        lses.append(l)
    res = out if out is not None else new_output((B, NQ, H, D), like=q)
    merge_partials(parts, lses, res, lse, q_index=q_index, S=SQ, scatter=out is not None)
    return res, lse


@triton.jit
def _mkv_bwd_dkdv(
    Q, QI, DO, LSE2, DELTA, K, V, KI, DK, DV,
    sqb, sqs, sqh, sqib, sdob, sdos, sdoh, skb, sks, skh, svb, svs, svh, skib, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    H, GROUP, SQ, NQ, L, M, D, qk_scale, dk_scale,
    HAS_QI: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of one block of a segment's key list (M entries: kv_index entries or all L keys) for
    one (batch, kv head), over every query row (q_index-gathered) of the group's q heads. Rows go
    to position n of DK / DV: the compact buffers with kv_index, the gradients themselves without."""
    pid = tl.program_id(0)
    b, kvh = kv_head_indices(tl.program_id(1), H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    n = pid.to(tl.int64) * BLOCK_N + offs_n
    rows_k, k_ok = _gather_rows(KI + b * skib, n, M, L, HAS_IDX)
    k = load_rows(K + b * skb + kvh * skh, rows_k, sks, offs_d, k_ok, d_mask, True, False)
    v = load_rows(V + b * svb + kvh * svh, rows_k, svs, offs_d, k_ok, d_mask, True, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        for start in range(0, NQ, BLOCK_M):
            m_idx = start + offs_m
            rows_q, q_ok = _gather_rows(QI + b * sqib, m_idx, NQ, SQ, HAS_QI)
            dk, dv = dkdv_step(dk, dv, k, v, Q + b * sqb + h * sqh, rows_q, sqs, DO + b * sdob + h * sdoh, m_idx,
                                sdos, LSE2 + bh * NQ, DELTA + bh * NQ, m_idx, q_ok, offs_d, d_mask, None, False,
                                qk_scale, 0.0, False)
    st = k_ok[:, None] & d_mask[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + n[:, None] * sdks + offs_d[None, :], (dk * dk_scale).to(DK.dtype.element_ty),
             mask=st)
    tl.store(DV + b * sdvb + kvh * sdvh + n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=st)


def _scatter_add_rows(dst, src, index):
    """dst[b, index[b, j]] += src[b, j] along dim 1 (index (n,) or (B, n); -1 or out-of-range
    entries are padding, whose src rows are zero)."""
    B = dst.shape[0]
    if dst.shape[1] == 0 or src.shape[1] == 0:
        return
    idx = index.long()
    idx = idx.expand(B, -1) if idx.dim() == 1 else idx
    idx = torch.where((idx >= 0) & (idx < dst.shape[1]), idx, 0)
    dst.scatter_add_(1, idx[:, :, None, None].expand(-1, -1, *dst.shape[2:]), src.to(dst.dtype))


def multi_kv_attention_backward_triton(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse,
                                       block=None):
    """(dq, dks, dvs) of multi_kv_attention_triton's (out, lse) (compact (B, n, H, D) out with
    q_index). dq rows outside q_index and keys outside kv_index get 0; repeats add up."""
    B, SQ, H, D = q.shape
    ks, vs = list(ks), list(vs)
    Hkv = ks[0].shape[2]
    kv_index = [_prep_index(i) for i in (kv_index if kv_index else [None] * len(ks))]
    q_index = _prep_index(q_index)
    NQ = out.shape[1]
    block = block or backward_block(q.device)
    lse2, delta = backward_row_stats(out, grad_out, lse, grad_lse)
    qk_scale = scale * LOG2E

    # dq: the forward walk over the segments (groups of MAX_SEGMENTS add up), compact rows
    f32 = dict(device=q.device, dtype=torch.float32)
    dq_c = torch.zeros((B, NQ, H, D), **f32)
    for g in range(0, len(ks), MAX_SEGMENTS):
        sl = slice(g, g + MAX_SEGMENTS)
        part = dq_c if g == 0 else torch.empty_like(dq_c)
        _mkv_launch(q, ks[sl], vs[sl], kv_index[sl], q_index, qk_scale, part, lse2, False, block,
                    bwd=(grad_out, lse2, delta, scale))
        if g:
            dq_c += part
    if q_index is None:
        dq = dq_c.to(q.dtype)
    else:
        dq = torch.zeros((B, SQ, H, D), **f32)
        _scatter_add_rows(dq, dq_c, q_index)
        dq = dq.to(q.dtype)

    block_d = max(16, triton.next_power_of_2(D))
    w, st = backward_launch_configs(block_d)[1] if q.device.type == "cuda" else (4, 1)
    qi = q_index if q_index is not None else lse2
    dks, dvs = [], []
    for k, v, idx in zip(ks, vs, kv_index):
        L = k.shape[1]
        M = L if idx is None else idx.shape[-1]
        if idx is None:
            dk, dv = new_output(k.shape, like=k), new_output(v.shape, like=v)
            dkc, dvc, ki, skib = dk, dv, k, 0
        else:
            dkc, dvc = torch.zeros((B, M, Hkv, D), **f32), torch.zeros((B, M, Hkv, D), **f32)
            ki, skib = idx, (0 if idx.dim() == 1 else idx.stride(0))
        if M and B * Hkv:
            _mkv_bwd_dkdv[(triton.cdiv(M, block), B * Hkv)](
                q, qi, grad_out, lse2, delta, k, v, ki, dkc, dvc,
                q.stride(0), q.stride(1), q.stride(2), 0 if q_index is None else q_index.stride(0),
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), skib, dkc.stride(0), dkc.stride(1), dkc.stride(2),
                dvc.stride(0), dvc.stride(1), dvc.stride(2),
                H, H // Hkv, SQ, NQ, L, M, D, qk_scale, scale,
                HAS_QI=q_index is not None, HAS_IDX=idx is not None,
                BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=w, num_stages=st)
        elif idx is None:
            dk.zero_()
            dv.zero_()
        if idx is not None:
            dk, dv = torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
            _scatter_add_rows(dk, dkc, idx)
            _scatter_add_rows(dv, dvc, idx)
            dk, dv = dk.to(k.dtype), dv.to(v.dtype)
        dks.append(dk)
        dvs.append(dv)
    return dq, dks, dvs


@triton.jit
def _seg_fwd(
    Q, K, V, O, LSE, CU, GM, GB,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    H, GROUP, S, G, D, qk_scale,
    DO, LSE2, DELTA, sdob, sdos, sdoh, dq_scale,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BWD: tl.constexpr = False,
):
    # The forward, or with BWD the dq pass of the backward (O is dq; see _mkv_fwd).
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kvh = head_indices(bh, H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    rows = pid.to(tl.int64) * BLOCK_M + offs_m
    q_ok = rows < S
    br = tl.zeros([BLOCK_M], dtype=tl.int32)        # branch of each query row
    for g in range(1, G):
        br += (rows >= tl.load(CU + g)).to(tl.int32)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :],
                mask=q_ok[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stats = bh.to(tl.int64) * S
    do, m_i, l_i = row_state(q, DO + b * sdob + h * sdoh, rows, sdos, LSE2 + stats, DELTA + stats, rows, q_ok,
                              offs_d, d_mask, BLOCK_M, False, BWD)
    k_ptr = K + b * skb + kvh * skh
    v_ptr = V + b * svb + kvh * svh
    for kb in range(0, G):
        k_lo = tl.load(CU + kb)
        k_hi = tl.load(CU + kb + 1)
        allow = (tl.load(GM + br * G + kb, mask=q_ok, other=0) != 0) & q_ok
        k_end = tl.where(tl.max(allow.to(tl.int32), 0) > 0, k_hi, k_lo)   # branch masked for the block: skipped
        if HAS_BIAS:
            bias = tl.load(GB + br * G + kb, mask=q_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        for start in range(k_lo, k_end, BLOCK_N):
            n = start + offs_n
            n_ok = n < k_hi
            kr = n.to(tl.int64)
            k = tl.load(k_ptr + kr[:, None] * sks + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + kr[:, None] * svs + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :], other=0.0)
            msk = allow[:, None] & n_ok[None, :]
            if HAS_BIAS:
                acc, m_i, l_i = _step_bias(q, do, acc, m_i, l_i, k, v, msk, bias, qk_scale, BWD)
            else:
                acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, msk, True, qk_scale, BWD)
    write_rows(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], LSE + bh.to(tl.int64) * S + rows,
                acc, m_i, l_i, q_ok, d_mask, dq_scale, BWD)


@triton.jit
def _seg_bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV, CU, GM, GB,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
    H, GROUP, S, G, D, qk_scale, dk_scale,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of one key block for one (batch, kv head). Key blocks are laid out branch by branch
    (a block never straddles two branches), so the whole block has one branch kb: it visits the
    query rows of every branch a with group_mask[a, kb] (bias group_bias[a, kb]), all q heads of
    the GQA group. Programs past the last block (the grid is a bound) do nothing."""
    pid = tl.program_id(0)
    b, kvh = kv_head_indices(tl.program_id(1), H, GROUP)
    # this program's branch kb and first key: walk the branches' block counts
    kb = tl.full([], 0, tl.int32) + G      # loop-carried: int32 tensors from the start
    k_start = tl.full([], 0, tl.int32)
    k_end = tl.full([], 0, tl.int32)
    first = tl.full([], 0, tl.int32)
    for g in range(0, G):
        lo = tl.load(CU + g)
        hi = tl.load(CU + g + 1)
        nb = (hi - lo + BLOCK_N - 1) // BLOCK_N
        here = (pid >= first) & (pid < first + nb)
        kb = tl.where(here, g, kb)
        k_start = tl.where(here, lo + (pid - first) * BLOCK_N, k_start)
        k_end = tl.where(here, hi, k_end)
        first += nb
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    rows_k = (k_start + offs_n).to(tl.int64)
    k_ok = rows_k < k_end
    k = load_rows(K + b * skb + kvh * skh, rows_k, sks, offs_d, k_ok, d_mask, True, False)
    v = load_rows(V + b * svb + kvh * svh, rows_k, svs, offs_d, k_ok, d_mask, True, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for a in range(0, G):
        q_lo = tl.load(CU + a)
        seen = (tl.load(GM + a * G + tl.minimum(kb, G - 1)) != 0) & (kb < G)
        q_hi = tl.where(seen, tl.load(CU + a + 1), q_lo)      # branch pair masked: no query visited
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(GB + a * G + tl.minimum(kb, G - 1)).to(tl.float32) * 1.4426950408889634
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            bh = b * H + h
            for start in range(q_lo, q_hi, BLOCK_M):
                rows = start + offs_m
                dk, dv = dkdv_step(dk, dv, k, v, Q + b * sqb + h * sqh, rows, sqs, DO + b * sdob + h * sdoh, rows,
                                    sdos, LSE2 + bh * S, DELTA + bh * S, rows, rows < q_hi, offs_d, d_mask, None,
                                    False, qk_scale, bias, False)
    st = k_ok[:, None] & d_mask[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + rows_k[:, None] * sdks + offs_d[None, :],
             (dk * dk_scale).to(DK.dtype.element_ty), mask=st)
    tl.store(DV + b * sdvb + kvh * sdvh + rows_k[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=st)


def segment_attention_triton(q, k, v, cu_seqlens, group_mask, group_bias, scale, block=None):
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    G = cu_seqlens.numel() - 1
    block_q, block_k, block_d, cfg = _launch_cfg(q, D, block)
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    if S == 0 or B * H == 0:
        return out, lse
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    gm = group_mask.to(device=q.device, dtype=torch.int8).contiguous()
    gb = (group_bias.to(device=q.device, dtype=torch.float32).contiguous() if group_bias is not None else gm)
    _seg_fwd[(triton.cdiv(S, block_q), B * H)](
        q, k, v, out, lse, cu, gm, gb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, H // Hkv, S, G, D, scale * LOG2E,
        q, lse, lse, 0, 0, 0, 1.0,  # the backward's inputs: unused here
        HAS_BIAS=group_bias is not None, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, **cfg)
    return out, lse


def segment_attention_backward_triton(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out,
                                      lse, block=None):
    """(dq, dk, dv) of segment_attention_triton's (out, lse); group_bias is a constant here."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    G = cu_seqlens.numel() - 1
    block = block or backward_block(q.device)
    block_d = max(16, triton.next_power_of_2(D))
    (wq, sq), (wk, sk) = backward_launch_configs(block_d) if q.device.type == "cuda" else ((4, 1), (4, 1))
    dq, dk, dv = new_output(q.shape, like=q), new_output(k.shape, like=k), new_output(v.shape, like=v)
    if S == 0 or B * H == 0:
        return dq, dk, dv
    lse2, delta = backward_row_stats(out, grad_out, lse, grad_lse)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    gm = group_mask.to(device=q.device, dtype=torch.int8).contiguous()
    gb = (group_bias.to(device=q.device, dtype=torch.float32).contiguous() if group_bias is not None else gm)
    common = dict(HAS_BIAS=group_bias is not None, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d)
    _seg_fwd[(triton.cdiv(S, block), B * H)](
        q, k, v, dq, lse2, cu, gm, gb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // Hkv, S, G, D, scale * LOG2E,
        grad_out, lse2, delta, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), scale,
        BWD=True, num_warps=wq, num_stages=sq, **common)
    # key blocks branch by branch: at most S / block + G of them (the grid is that bound)
    _seg_bwd_dkdv[(triton.cdiv(S, block) + G, B * Hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, cu, gm, gb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, H // Hkv, S, G, D, scale * LOG2E, scale, num_warps=wk, num_stages=sk, **common)
    return dq, dk, dv
