"""Triton engine of the sparse-token family: more plans for the window engine (same jit helpers).

multi_kv_attention: one program per (query block, batch x head); it gathers its query rows itself
(q_index), then visits up to MAX_SEGMENTS K/V segments in turn with one shared online-softmax
state (no concatenation); a segment's keys are a dense range, or a gathered subset (kv_index).
Results go to a compact (B, n, H, D) output, or are scattered into `out` in place. More segments
are processed in groups of MAX_SEGMENTS whose partial results merge exactly through the lse.

segment_attention: one program per (query block, batch x head); each row knows its branch; the
program visits only the key branches some of its rows may see (a whole masked branch is skipped,
never computed), with a per-row mask/bias only where the block straddles branches."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output
from ..window.triton import (LOG2E, _dense_range, _finish, _head_indices, _online_update, _softmax_step,
                             default_blocks, launch_configs)

MAX_SEGMENTS = 4


@triton.jit
def _softmax_step_bias(q, acc, m_i, l_i, k, v, qk_mask, bias, qk_scale):
    """_softmax_step with a per-row additive bias (log2 units) and an element mask."""
    qk = tl.dot(q, tl.trans(k)) * qk_scale + bias[:, None]
    return _online_update(tl.where(qk_mask, qk, float("-inf")), acc, m_i, l_i, v)


@triton.jit
def _kv_segment(q, acc, m_i, l_i, k_ptr, v_ptr, sk, sv, idx_ptr, L, M, active, qk_scale,
                offs_n, offs_d, d_mask, HAS_IDX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attend to one segment: keys [0, L), or the M keys idx_ptr[0..M) (-1 = padding)."""
    hi = tl.where(active, M, 0)
    if HAS_IDX:
        for start in range(0, hi, BLOCK_N):
            n = start + offs_n
            n_ok = n < hi
            rows = tl.load(idx_ptr + n, mask=n_ok, other=-1).to(tl.int64)
            n_ok = n_ok & (rows >= 0) & (rows < L)
            rows = tl.where(n_ok, rows, 0)
            k = tl.load(k_ptr + rows[:, None] * sk + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + rows[:, None] * sv + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :], other=0.0)
            acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k, v, n_ok[None, :], True, qk_scale)
    else:
        acc, m_i, l_i = _dense_range(q, q, acc, m_i, l_i, k_ptr, v_ptr, sk, sv, 0, hi, qk_scale,
                                     offs_n, offs_d, d_mask, BLOCK_N, False)
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
    NSEG: tl.constexpr, HI0: tl.constexpr, HI1: tl.constexpr, HI2: tl.constexpr, HI3: tl.constexpr,
    HAS_QI: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kvh = _head_indices(bh, H, GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_idx = pid.to(tl.int64) * BLOCK_M + offs_m
    m_ok = m_idx < NQ
    if HAS_QI:  # gather the query rows in the kernel
        rows_q = tl.load(QI + b * sqib + m_idx, mask=m_ok, other=-1).to(tl.int64)
        q_ok = m_ok & (rows_q >= 0) & (rows_q < SQ)
        rows_q = tl.where(q_ok, rows_q, 0)
    else:
        rows_q = m_idx
        q_ok = m_ok
    active = tl.max(q_ok.to(tl.int32), 0) > 0      # all-padding blocks skip every key
    q = tl.load(Q + b * sqb + h * sqh + rows_q[:, None] * sqs + offs_d[None, :],
                mask=q_ok[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc, m_i, l_i = _kv_segment(q, acc, m_i, l_i, K0 + b * sk0b + kvh * sk0h, V0 + b * sv0b + kvh * sv0h,
                                sk0s, sv0s, I0 + b * si0b, L0, M0, active, qk_scale, offs_n, offs_d, d_mask,
                                HI0, BLOCK_N)
    if NSEG > 1:
        acc, m_i, l_i = _kv_segment(q, acc, m_i, l_i, K1 + b * sk1b + kvh * sk1h, V1 + b * sv1b + kvh * sv1h,
                                    sk1s, sv1s, I1 + b * si1b, L1, M1, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI1, BLOCK_N)
    if NSEG > 2:
        acc, m_i, l_i = _kv_segment(q, acc, m_i, l_i, K2 + b * sk2b + kvh * sk2h, V2 + b * sv2b + kvh * sv2h,
                                    sk2s, sv2s, I2 + b * si2b, L2, M2, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI2, BLOCK_N)
    if NSEG > 3:
        acc, m_i, l_i = _kv_segment(q, acc, m_i, l_i, K3 + b * sk3b + kvh * sk3h, V3 + b * sv3b + kvh * sv3h,
                                    sk3s, sv3s, I3 + b * si3b, L3, M3, active, qk_scale, offs_n, offs_d, d_mask,
                                    HI3, BLOCK_N)

    out, lse = _finish(acc, m_i, l_i)
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
        block = default_blocks(q.device, D)
    block_q, block_k = (block, block) if isinstance(block, int) else block
    block_d = max(16, triton.next_power_of_2(D))
    w, st = launch_configs(block_d, block_k)[0]
    return block_q, block_k, block_d, dict(num_warps=w if block_q >= 64 else 4, num_stages=st)


def _mkv_launch(q, ks, vs, kv_index, q_index, qk_scale, o, lse, scatter, block):
    B, SQ, H, D = q.shape
    NQ = lse.shape[2]
    Hkv = ks[0].shape[2]
    block_q, block_k, block_d, cfg = _launch_cfg(q, D, block)
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
    _mkv_fwd[grid](
        q, qi, o, lse, *seg_args,
        q.stride(0), q.stride(1), q.stride(2), sqib, o.stride(0), o.stride(1), o.stride(2),
        H, H // Hkv, SQ, NQ, D, qk_scale,
        NSEG=nseg, HI0=has_idx[0], HI1=has_idx[1], HI2=has_idx[2], HI3=has_idx[3],
        HAS_QI=q_index is not None, SCATTER=scatter,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, **cfg)


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
def _seg_fwd(
    Q, K, V, O, LSE, CU, GM, GB,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    H, GROUP, S, G, D, qk_scale,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, kvh = _head_indices(bh, H, GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = pid.to(tl.int64) * BLOCK_M + offs_m
    q_ok = rows < S
    br = tl.zeros([BLOCK_M], dtype=tl.int32)        # branch of each query row
    for g in range(1, G):
        br += (rows >= tl.load(CU + g)).to(tl.int32)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :],
                mask=q_ok[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
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
                acc, m_i, l_i = _softmax_step_bias(q, acc, m_i, l_i, k, v, msk, bias, qk_scale)
            else:
                acc, m_i, l_i = _softmax_step(q, acc, m_i, l_i, k, v, msk, True, qk_scale)
    out, lse = _finish(acc, m_i, l_i)
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * S + rows, lse, mask=q_ok)


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
        HAS_BIAS=group_bias is not None, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, **cfg)
    return out, lse
