"""Backward Triton kernels of the linear-attention family and their launchers.

``_grad_q_kernel`` (dq and the partial reductions of dS, dz over query chunks) and
``_grad_kv_kernel`` (dk, dv from the reduced dS, dz), both streaming a chunk of rows against a
state tile loaded once per program. Head dims whose whole D x Dv tiles would not fit on chip
(above 128, ``launch.backward_whole_tiles``) take the wide kernels instead (``_grad_rows_kernel``,
``_grad_s_wide_kernel``, ``_grad_feature_kernel`` and the forward's apply kernel for dv), which
read the states in Dv blocks. Which path a call takes is ``engine.py``'s choice (``wide``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._linear_core import dtype_flags, lastdim, new_output
from .._linear_core.triton import mm as _mm
from . import triton_common as common
from .triton_common import launch as _launch
from .launch import Launch, chunking, even_flags
from .triton_common import FEATURE_MAP_IDS, _dot_columns, _dphi, _ld, _phi, _program_rows, _seq_base, _st
from .triton_forward import linear_attention_apply_triton, linear_attention_state_triton


@triton.jit
def _grad_q_step(qb, gb, db, s0, end, sqs, sgs, sds, offs_d, offs_e, md, me, kv, kvt, z, gS, gz, scale, eps,
                 FM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr, LOWP: tl.constexpr,
                 IEEE: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Few fp32 rows x D tiles live at once (with the D x Dv dS accumulator they spilled at D = 128):
    # phi(q) in fp32 only until 1/den, phi'(q) recomputed from q at the end, dz as a small dot.
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    q = _ld(qb + offs_m[:, None] * sqs + offs_d[None, :], mm, md, MASK_M, not EVEN_D)
    g = _ld(gb + offs_m[:, None] * sgs + offs_e[None, :], mm, me, MASK_M, not EVEN_DV)
    qs = q.to(tl.float32)
    if HAS_SCALE:
        qs = qs * scale
    fq = _phi(qs, FM)  # padded rows have g = 0, so they add nothing below
    if LOWP:
        fq_op = fq.to(q.dtype)
    else:
        fq_op = fq
    g32 = g.to(tl.float32)
    if NORMALIZE:
        rden = 1.0 / (tl.sum(fq * z[None, :], 1) + eps)
        num = _mm(fq_op, kv, tl.zeros((BLOCK_M, BLOCK_DV), tl.float32), LOWP, IEEE)
        ga = g32 * rden[:, None]
        gd = -tl.sum(g32 * num, 1) * rden * rden  # -(g . o) / den
    else:
        ga = g32
    if LOWP:
        ga_op = ga.to(g.dtype)
    else:
        ga_op = ga
    gfq = _mm(ga_op, kvt, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), LOWP, IEEE)
    if NORMALIZE:
        gfq += gd[:, None] * z[None, :]
        # dz += phi(q)^T gd as a (D x 16) dot sharing dS's operand
        gz = _mm(tl.trans(fq_op), _dot_columns(gd, g.dtype, LOWP), gz, LOWP, IEEE)
    x = q.to(tl.float32)
    if HAS_SCALE:
        x = x * scale
    dq = gfq * _dphi(x, FM)
    if HAS_SCALE:
        dq = dq * scale
    _st(db + offs_m[:, None] * sds + offs_d[None, :], dq.to(db.dtype.element_ty), mm, md, MASK_M, not EVEN_D)
    gS = _mm(tl.trans(fq_op), ga_op, gS, LOWP, IEEE)
    return gS, gz


@triton.jit
def _grad_q_kernel(Q, G, KV, KS, CNT, DQ, PGS, PGZ, CU,
                   sqb, sqs, sqh, sgb, sgs, sgh, sdb, sds, sdh,
                   S, NSEQ, H, HKV, D, DV, CHUNK, scale, eps,
                   FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   LOWP: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (sequence x head, query chunk): dq for its rows, and its partial
    dS = sum_i phi(q_i)^T ga_i (D x Dv) and dz = sum_i phi(q_i) gd_i (already divided by N)."""
    pid_c = tl.program_id(1)
    b, h, _, start, end = _program_rows(CU, S, H, 1, CHUNK, VARLEN)
    pid_bh = b * H + h
    hk = h // (H // HKV)
    qb = _seq_base(Q, b, h, sqb, sqh, VARLEN)
    gb = _seq_base(G, b, h, sgb, sgh, VARLEN)
    db = _seq_base(DQ, b, h, sdb, sdh, VARLEN)
    n_full = tl.maximum(end - start, 0) // BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    st = (b.to(tl.int64) * HKV + hk) * D
    kv = tl.load(KV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
    z = tl.load(KS + st + offs_d, mask=md, other=0.0)
    inv_n = 1.0
    if NORMALIZE:
        inv_n = 1.0 / tl.maximum(tl.load(CNT + b), 1).to(tl.float32)
        kv = kv * inv_n
        z = z * inv_n
    if LOWP:
        kv = kv.to(Q.dtype.element_ty)
    kvt = tl.trans(kv)
    gS = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    gz = tl.zeros((BLOCK_D, 16), tl.float32)   # dz in column sums (see _grad_q_step)
    for i in range(0, n_full):
        gS, gz = _grad_q_step(qb, gb, db, start + i * BLOCK_M, end, sqs, sgs, sds, offs_d, offs_e, md, me, kv, kvt,
                              z, gS, gz, scale, eps, FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, False, EVEN_D, EVEN_DV,
                              BLOCK_M, BLOCK_D, BLOCK_DV)
    tail = start + n_full * BLOCK_M
    if tail < end:
        gS, gz = _grad_q_step(qb, gb, db, tail, end, sqs, sgs, sds, offs_d, offs_e, md, me, kv, kvt,
                              z, gS, gz, scale, eps, FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, True, EVEN_D, EVEN_DV,
                              BLOCK_M, BLOCK_D, BLOCK_DV)
    slot = pid_c.to(tl.int64) * NSEQ * H + pid_bh
    gz = tl.sum(gz, 1)
    if NORMALIZE:
        gS = gS * inv_n
        gz = gz * inv_n
    tl.store(PGS + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], gS, mask=md[:, None] & me[None, :])
    tl.store(PGZ + slot * D + offs_d, gz, mask=md)


@triton.jit
def _grad_kv_step(kb, vb, dkb, dvb, s0, end, sks, svs, sdks, sdvs, offs_d, offs_e, md, me, gS, gSt, gz,
                  FM: tl.constexpr, NORMALIZE: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr,
                  MASK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    k = _ld(kb + offs_m[:, None] * sks + offs_d[None, :], mm, md, MASK_M, not EVEN_D)
    v = _ld(vb + offs_m[:, None] * svs + offs_e[None, :], mm, me, MASK_M, not EVEN_DV)
    k32 = k.to(tl.float32)
    fk = _phi(k32, FM)
    if LOWP:
        gfk = _mm(v, gSt, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), LOWP, IEEE)
        gv = _mm(fk.to(k.dtype), gS, tl.zeros((BLOCK_M, BLOCK_DV), tl.float32), LOWP, IEEE)
    else:
        gfk = _mm(v.to(tl.float32), gSt, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), LOWP, IEEE)
        gv = _mm(fk, gS, tl.zeros((BLOCK_M, BLOCK_DV), tl.float32), LOWP, IEEE)
    if NORMALIZE:
        gfk += gz[None, :]
    dk = gfk * _dphi(k32, FM)
    _st(dkb + offs_m[:, None] * sdks + offs_d[None, :], dk.to(dkb.dtype.element_ty), mm, md, MASK_M, not EVEN_D)
    _st(dvb + offs_m[:, None] * sdvs + offs_e[None, :], gv.to(dvb.dtype.element_ty), mm, me, MASK_M, not EVEN_DV)


@triton.jit
def _grad_kv_kernel(K, V, GS, GZ, DK, DV_, CU,
                    skb, sks, skh, svb, svs, svh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
                    S, HKV, D, DV, CHUNK,
                    FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr,
                    LOWP: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk_j = phi'(k_j) (dS v_j + dz), dv_j = dS^T phi(k_j) with dS, dz reduced over the group;
    one program per (sequence x kv head, key chunk), dS loaded once."""
    b, h, _, start, end = _program_rows(CU, S, HKV, 1, CHUNK, VARLEN)
    if start < end:
        kb = _seq_base(K, b, h, skb, skh, VARLEN)
        vb = _seq_base(V, b, h, svb, svh, VARLEN)
        dkb = _seq_base(DK, b, h, sdkb, sdkh, VARLEN)
        dvb = _seq_base(DV_, b, h, sdvb, sdvh, VARLEN)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = tl.arange(0, BLOCK_DV)
        md = offs_d < D
        me = offs_e < DV
        st = (b.to(tl.int64) * HKV + h) * D
        gS = tl.load(GS + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
        gz = tl.load(GZ + st + offs_d, mask=md, other=0.0)
        if LOWP:
            gS = gS.to(K.dtype.element_ty)
        gSt = tl.trans(gS)
        n_full = (end - start) // BLOCK_M
        for i in range(0, n_full):
            _grad_kv_step(kb, vb, dkb, dvb, start + i * BLOCK_M, end, sks, svs, sdks, sdvs, offs_d, offs_e, md, me,
                          gS, gSt, gz, FM, NORMALIZE, LOWP, IEEE, False, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_D, BLOCK_DV)
        tail = start + n_full * BLOCK_M
        if tail < end:
            _grad_kv_step(kb, vb, dkb, dvb, tail, end, sks, svs, sdks, sdvs, offs_d, offs_e, md, me,
                          gS, gSt, gz, FM, NORMALIZE, LOWP, IEEE, True, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_D, BLOCK_DV)


# Head dims whose D x Dv tiles do not fit on chip (backward_whole_tiles is False). No program
# holds a D x Dv tile, nor more than about one rows x BLOCK_D fp32 tile (more spills registers at
# BLOCK_D = 256), so the q side takes three passes: _grad_rows_kernel finds each row's 1/den and
# gd, _grad_s_wide_kernel reduces dS, dz one Dv block per program, _grad_feature_kernel streams
# dq from g and S in Dv blocks; it then streams dk from v and dS, and dv = phi(k) dS is the apply
# kernel's product (normalize off).


@triton.jit
def _grad_rows_step(qb, gb, wb, s0, end, sqs, sgs, sws, sl, offs_d, md, z, scale, eps, DV, NE,
                    FM: tl.constexpr, HAS_SCALE: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr,
                    MASK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    q = _ld(qb + offs_m[:, None] * sqs + offs_d[None, :], mm, md, MASK_M, not EVEN_D)
    qs = q.to(tl.float32)
    if HAS_SCALE:
        qs = qs * scale
    fq = _phi(qs, FM)
    rden = 1.0 / (tl.sum(fq * z[None, :], 1) + eps)
    if LOWP:
        fq_op = fq.to(q.dtype)
    else:
        fq_op = fq
    gdot = tl.zeros((BLOCK_M,), tl.float32)   # g . (phi(q) S)
    for e in range(0, NE):
        offs_e = e * BLOCK_DV + tl.arange(0, BLOCK_DV)
        me = offs_e < DV
        g = _ld(gb + offs_m[:, None] * sgs + offs_e[None, :], mm, me, MASK_M, not EVEN_DV)
        s = tl.load(sl + offs_d[:, None] * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
        num = _mm(fq_op, s, tl.zeros((BLOCK_M, BLOCK_DV), tl.float32), LOWP, IEEE)
        gdot += tl.sum(g.to(tl.float32) * num, 1)
    tl.store(wb + offs_m * sws, rden, mask=mm)
    tl.store(wb + offs_m * sws + 1, -gdot * rden * rden, mask=mm)   # gd = -(g . o) / den


@triton.jit
def _grad_rows_kernel(Q, G, SL, KS, W, CU,
                      sqb, sqs, sqh, sgb, sgs, sgh, swb, sws, swh,
                      S, H, HKV, D, DV, NE, CHUNK, scale, eps,
                      FM: tl.constexpr, VARLEN: tl.constexpr, HAS_SCALE: tl.constexpr, LOWP: tl.constexpr,
                      IEEE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Normalised mode: each query row's 1/den and gd into W (B, S, H, 2), for one (sequence x
    head, query chunk); SL is the state S (already / N, operand dtype), KS z."""
    b, h, _, start, end = _program_rows(CU, S, H, 1, CHUNK, VARLEN)
    hk = h // (H // HKV)
    if start < end:
        qb = _seq_base(Q, b, h, sqb, sqh, VARLEN)
        gb = _seq_base(G, b, h, sgb, sgh, VARLEN)
        wb = _seq_base(W, b, h, swb, swh, VARLEN)
        offs_d = tl.arange(0, BLOCK_D)
        md = offs_d < D
        st = (b.to(tl.int64) * HKV + hk) * D
        sl = SL + st * DV
        z = tl.load(KS + st + offs_d, mask=md, other=0.0)
        n_full = (end - start) // BLOCK_M
        for i in range(0, n_full):
            _grad_rows_step(qb, gb, wb, start + i * BLOCK_M, end, sqs, sgs, sws, sl, offs_d, md, z, scale, eps, DV, NE,
                            FM, HAS_SCALE, LOWP, IEEE, False, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_DV)
        tail = start + n_full * BLOCK_M
        if tail < end:
            _grad_rows_step(qb, gb, wb, tail, end, sqs, sgs, sws, sl, offs_d, md, z, scale, eps, DV, NE,
                            FM, HAS_SCALE, LOWP, IEEE, True, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_DV)


@triton.jit
def _grad_s_wide_step(qb, gb, wb, s0, end, sqs, sgs, sws, offs_d, offs_e, md, me, gS, gz, scale,
                      FM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr, LOWP: tl.constexpr,
                      IEEE: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    q = _ld(qb + offs_m[:, None] * sqs + offs_d[None, :], mm, md, MASK_M, not EVEN_D)
    g = _ld(gb + offs_m[:, None] * sgs + offs_e[None, :], mm, me, MASK_M, not EVEN_DV)
    qs = q.to(tl.float32)
    if HAS_SCALE:
        qs = qs * scale
    fq = _phi(qs, FM)
    ga = g.to(tl.float32)
    if NORMALIZE:  # padded rows: g = 0 and gd = 0, so they add nothing
        ga = ga * tl.load(wb + offs_m * sws, mask=mm, other=0.0)[:, None]
        gz += tl.sum(fq * tl.load(wb + offs_m * sws + 1, mask=mm, other=0.0)[:, None], 0)
    if LOWP:
        gS = _mm(tl.trans(fq.to(q.dtype)), ga.to(g.dtype), gS, LOWP, IEEE)
    else:
        gS = _mm(tl.trans(fq), ga, gS, LOWP, IEEE)
    return gS, gz


@triton.jit
def _grad_s_wide_kernel(Q, G, W, PGS, PGZ, CU,
                        sqb, sqs, sqh, sgb, sgs, sgh, swb, sws, swh,
                        S, NSEQ, H, D, DV, NE, CHUNK, scale,
                        FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                        LOWP: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (sequence x head x Dv block, query chunk): its chunk's partial
    dS = sum_i phi(q_i)^T (g_i / den_i) for one Dv block (D x BLOCK_DV, not yet / N) and, in the
    first Dv block, dz = sum_i phi(q_i) gd_i (1/den, gd from W); every chunk writes its own slot."""
    pid_c = tl.program_id(1)
    b, h, pid_e, start, end = _program_rows(CU, S, H, NE, CHUNK, VARLEN)
    pid_bh = b * H + h
    qb = _seq_base(Q, b, h, sqb, sqh, VARLEN)
    gb = _seq_base(G, b, h, sgb, sgh, VARLEN)
    wb = _seq_base(W, b, h, swb, swh, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    gS = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    gz = tl.zeros((BLOCK_D,), tl.float32)
    n_full = tl.maximum(end - start, 0) // BLOCK_M
    for i in range(0, n_full):
        gS, gz = _grad_s_wide_step(qb, gb, wb, start + i * BLOCK_M, end, sqs, sgs, sws, offs_d, offs_e, md, me,
                                   gS, gz, scale, FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, False, EVEN_D, EVEN_DV,
                                   BLOCK_M)
    tail = start + n_full * BLOCK_M
    if tail < end:
        gS, gz = _grad_s_wide_step(qb, gb, wb, tail, end, sqs, sgs, sws, offs_d, offs_e, md, me,
                                   gS, gz, scale, FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, True, EVEN_D, EVEN_DV,
                                   BLOCK_M)
    slot = pid_c.to(tl.int64) * NSEQ * H + pid_bh
    tl.store(PGS + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], gS, mask=md[:, None] & me[None, :])
    if pid_e == 0:
        tl.store(PGZ + slot * D + offs_d, gz, mask=md)


@triton.jit
def _grad_feature_step(xb, yb, ob, wb, s0, end, sxs, sys_, sos, sws, tl_, offs_d, md, c, scale, DV, NE,
                       FM: tl.constexpr, ROW_W: tl.constexpr, ADD_C: tl.constexpr, HAS_SCALE: tl.constexpr,
                       LOWP: tl.constexpr, IEEE: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                       EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)   # x @ T^T
    for e in range(0, NE):
        offs_e = e * BLOCK_DV + tl.arange(0, BLOCK_DV)
        me = offs_e < DV
        x = _ld(xb + offs_m[:, None] * sxs + offs_e[None, :], mm, me, MASK_M, not EVEN_DV)
        t = tl.load(tl_ + offs_d[:, None] * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
        if LOWP:
            acc = _mm(x, tl.trans(t), acc, LOWP, IEEE)
        else:
            acc = _mm(x.to(tl.float32), tl.trans(t), acc, LOWP, IEEE)
    if ROW_W:   # dq: (g @ S^T) / den + gd z
        acc = acc * tl.load(wb + offs_m * sws, mask=mm, other=0.0)[:, None]
        acc += tl.load(wb + offs_m * sws + 1, mask=mm, other=0.0)[:, None] * c[None, :]
    elif ADD_C:  # dk: dS v + dz
        acc += c[None, :]
    y = _ld(yb + offs_m[:, None] * sys_ + offs_d[None, :], mm, md, MASK_M, not EVEN_D).to(tl.float32)
    if HAS_SCALE:
        y = y * scale
    acc = acc * _dphi(y, FM)
    if HAS_SCALE:
        acc = acc * scale
    _st(ob + offs_m[:, None] * sos + offs_d[None, :], acc.to(ob.dtype.element_ty), mm, md, MASK_M, not EVEN_D)


@triton.jit
def _grad_feature_kernel(X, Y, T, C, W, O, CU,
                         sxb, sxs, sxh, syb, sys_, syh, sob, sos, soh, swb, sws, swh,
                         S, H, HKV, D, DV, NE, CHUNK, scale,
                         FM: tl.constexpr, VARLEN: tl.constexpr, ROW_W: tl.constexpr, ADD_C: tl.constexpr,
                         HAS_SCALE: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
                         EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
    """The gradient of the feature-mapped rows y (q or k) for one (sequence x head, row chunk):
    o_i = phi'(y_i) (a_i x_i T^T + b_i c) with x the Dv-wide rows (g or v), T the state (S or dS,
    D x Dv in the operand dtype, read in Dv blocks), c a D-vector (z or dz); a_i, b_i from W
    (ROW_W: 1/den and gd) or 1 (ADD_C) or a_i = 1, b_i = 0. HAS_SCALE: y is scaled before phi and
    the result by the same factor (dq)."""
    b, h, _, start, end = _program_rows(CU, S, H, 1, CHUNK, VARLEN)
    hk = h // (H // HKV)
    if start < end:
        xb = _seq_base(X, b, h, sxb, sxh, VARLEN)
        yb = _seq_base(Y, b, h, syb, syh, VARLEN)
        ob = _seq_base(O, b, h, sob, soh, VARLEN)
        wb = _seq_base(W, b, h, swb, swh, VARLEN)
        offs_d = tl.arange(0, BLOCK_D)
        md = offs_d < D
        st = (b.to(tl.int64) * HKV + hk) * D
        tl_ = T + st * DV
        c = tl.load(C + st + offs_d, mask=md, other=0.0)
        n_full = (end - start) // BLOCK_M
        for i in range(0, n_full):
            _grad_feature_step(xb, yb, ob, wb, start + i * BLOCK_M, end, sxs, sys_, sos, sws, tl_, offs_d, md, c,
                               scale, DV, NE, FM, ROW_W, ADD_C, HAS_SCALE, LOWP, IEEE, False, EVEN_D, EVEN_DV,
                               BLOCK_M, BLOCK_D, BLOCK_DV)
        tail = start + n_full * BLOCK_M
        if tail < end:
            _grad_feature_step(xb, yb, ob, wb, tail, end, sxs, sys_, sos, sws, tl_, offs_d, md, c,
                               scale, DV, NE, FM, ROW_W, ADD_C, HAS_SCALE, LOWP, IEEE, True, EVEN_D, EVEN_DV,
                               BLOCK_M, BLOCK_D, BLOCK_DV)


# --------------------------------------------------------------------------------------------- launchers


def linear_attention_backward_triton(grad_out, q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None,
                                     cu_seqlens=None, cu_seqlens_k=None, *, launch: Launch, wide: bool):
    """(dq, dk, dv). wide: the wide kernels (states read in Dv blocks) instead of whole D x Dv tiles
    (engine.py decides: launch.backward_whole_tiles)."""
    q, k, v, g = lastdim(q), lastdim(k), lastdim(v), lastdim(grad_out)
    B, Sq, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    lens = common.max_lens(q, k, cu_seqlens, cu_seqlens_k)
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if wide:
        return _backward_wide(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, lens, launch)
    # grad_q streams q's rows (cu_seqlens), grad_kv k's rows (cu_seqlens_k); both index the same
    # sequences, so the state and the reduced dS, dz are per sequence on either side.
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens_k, max_len=lens[1],
                                                         launch=launch)
    nseq, max_len, cu = common.seqs(q, cu_seqlens, lens[0])
    lowp, ieee = dtype_flags(q.dtype)
    gpu = q.device.type == "cuda"
    fm = FEATURE_MAP_IDS[feature_map]
    varlen = cu_seqlens is not None
    cq = launch.candidates("grad_q", D, Dv, q.dtype, gpu)
    even = even_flags(D, Dv, cq[0])
    n_chunks, chunk = chunking(max_len, nseq * H, q.device, launch.programs_per_sm)
    dq = new_output(q.shape, like=q)
    pgs = torch.empty(n_chunks, nseq, H, D, Dv, dtype=torch.float32, device=q.device)
    pgz = torch.empty(n_chunks, nseq, H, D, dtype=torch.float32, device=q.device)
    if nseq * H > 0:
        _launch("grad_q", _grad_q_kernel, (nseq * H, n_chunks),
                [q, g, kv_sum, k_sum, count, dq, pgs, pgz, cu, q.stride(0), q.stride(1), q.stride(2),
                 g.stride(0), g.stride(1), g.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
                 Sq, nseq, H, Hkv, D, Dv, chunk, 1.0 if scale is None else float(scale), float(eps)],
                dict(FM=fm, VARLEN=varlen, NORMALIZE=bool(normalize), HAS_SCALE=scale is not None, LOWP=lowp,
                     IEEE=ieee, **even),
                cq, key=["D", "DV", "FM", "VARLEN", "NORMALIZE"])
    gS = pgs.sum(0).view(nseq, Hkv, H // max(Hkv, 1), D, Dv).sum(2).contiguous()
    gz = pgz.sum(0).view(nseq, Hkv, H // max(Hkv, 1), D).sum(2).contiguous()
    dk = new_output(k.shape, like=k)
    dv = new_output(v.shape, like=v)
    _, max_len_k, cu_k = common.seqs(k, cu_seqlens_k, lens[1])
    ckv = launch.candidates("grad_kv", D, Dv, k.dtype, gpu)
    n_chunks_k, chunk_k = chunking(max_len_k, nseq * Hkv, k.device, launch.programs_per_sm)
    if nseq * Hkv > 0 and max_len_k > 0:
        _launch("grad_kv", _grad_kv_kernel, (nseq * Hkv, n_chunks_k),
                [k, v, gS, gz, dk, dv, cu_k, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                 v.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                 k.shape[1], Hkv, D, Dv, chunk_k],
                dict(FM=fm, VARLEN=varlen, NORMALIZE=bool(normalize), LOWP=lowp, IEEE=ieee, **even),
                ckv, key=["D", "DV", "FM", "VARLEN", "NORMALIZE"])
    return dq, dk, dv


def _backward_wide(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, lens, launch):
    """The backward for head dims above launch.backward_whole_tiles': each row's 1/den, gd, the q-side
    reduction of dS, dz, then dq, dk (_grad_feature_kernel) and dv (the apply kernel), with the
    D x Dv states read in Dv blocks. lens: _max_lens of the packings."""
    B, Sq, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens_k, max_len=lens[1],
                                                         launch=launch)
    nseq, max_len, cu = common.seqs(q, cu_seqlens, lens[0])
    lowp, ieee = dtype_flags(q.dtype)
    op_dtype = q.dtype if lowp else torch.float32
    gpu = q.device.type == "cuda"
    fm = FEATURE_MAP_IDS[feature_map]
    varlen = cu_seqlens is not None
    # S = kv_sum / N and z = k_sum / N (normalised), S rounded once to the dot operand dtype
    inv_n = 1.0 / count.clamp(min=1).to(torch.float32) if normalize else torch.ones_like(count, dtype=torch.float32)
    sl = (kv_sum * inv_n[:, None, None, None]).to(op_dtype).contiguous()
    z = (k_sum * inv_n[:, None, None]).contiguous()
    flags = dict(FM=fm, VARLEN=varlen, LOWP=lowp, IEEE=ieee)
    scale_f = 1.0 if scale is None else float(scale)
    key = ["D", "DV", "FM", "VARLEN"]

    w = torch.empty(B, Sq, H, 2, dtype=torch.float32, device=q.device)   # per row: 1 / den, gd
    if normalize and nseq * H > 0 and max_len > 0:
        cr = launch.candidates("grad_rows", D, Dv, q.dtype, gpu)
        n_chunks, chunk = chunking(max_len, nseq * H, q.device, launch.programs_per_sm)
        _launch("grad_rows", _grad_rows_kernel, (nseq * H, n_chunks),
                [q, g, sl, z, w, cu, *q.stride()[:3], *g.stride()[:3], *w.stride()[:3],
                 Sq, H, Hkv, D, Dv, triton.cdiv(Dv, cr[0]["BLOCK_DV"]), chunk, scale_f, float(eps)],
                dict(flags, HAS_SCALE=scale is not None, **even_flags(D, Dv, cr[0])), cr, key)
    cs = launch.candidates("grad_s_wide", D, Dv, q.dtype, gpu)
    n_e = triton.cdiv(Dv, cs[0]["BLOCK_DV"])
    n_chunks, chunk = chunking(max_len, nseq * H * n_e, q.device, launch.programs_per_sm)
    pgs = torch.empty(n_chunks, nseq, H, D, Dv, dtype=torch.float32, device=q.device)
    pgz = torch.empty(n_chunks, nseq, H, D, dtype=torch.float32, device=q.device)
    if nseq * H > 0:
        _launch("grad_s_wide", _grad_s_wide_kernel, (nseq * H * n_e, n_chunks),
                [q, g, w, pgs, pgz, cu, *q.stride()[:3], *g.stride()[:3], *w.stride()[:3],
                 Sq, nseq, H, D, Dv, n_e, chunk, scale_f],
                dict(flags, NORMALIZE=bool(normalize), HAS_SCALE=scale is not None, **even_flags(D, Dv, cs[0])),
                cs, key + ["NORMALIZE"])
    groups = H // max(Hkv, 1)
    gs = pgs.sum(0).view(nseq, Hkv, groups, D, Dv).sum(2) * inv_n[:, None, None, None]
    gz = (pgz.sum(0).view(nseq, Hkv, groups, D).sum(2) * inv_n[:, None, None]).contiguous()

    cf = launch.candidates("grad_feature", D, Dv, q.dtype, gpu)
    n_e = triton.cdiv(Dv, cf[0]["BLOCK_DV"])
    feature = dict(flags, **even_flags(D, Dv, cf[0]))
    dq = new_output(q.shape, like=q)
    n_chunks, chunk = chunking(max_len, nseq * H, q.device, launch.programs_per_sm)
    if nseq * H > 0 and max_len > 0:
        _launch("grad_feature", _grad_feature_kernel, (nseq * H, n_chunks),
                [g, q, sl, z, w, dq, cu, *g.stride()[:3], *q.stride()[:3], *dq.stride()[:3], *w.stride()[:3],
                 Sq, H, Hkv, D, Dv, n_e, chunk, scale_f],
                dict(feature, ROW_W=bool(normalize), ADD_C=False, HAS_SCALE=scale is not None),
                cf, key + ["ROW_W", "ADD_C", "HAS_SCALE"])
    dk = new_output(k.shape, like=k)
    _, max_len_k, cu_k = common.seqs(k, cu_seqlens_k, lens[1])
    n_chunks_k, chunk_k = chunking(max_len_k, nseq * Hkv, k.device, launch.programs_per_sm)
    if nseq * Hkv > 0 and max_len_k > 0:
        _launch("grad_feature", _grad_feature_kernel, (nseq * Hkv, n_chunks_k),
                [v, k, gs.to(op_dtype).contiguous(), gz, k, dk, cu_k, *v.stride()[:3], *k.stride()[:3],   # (W: unread)
                 *dk.stride()[:3], 0, 0, 0, k.shape[1], Hkv, Hkv, D, Dv, n_e, chunk_k, 1.0],
                dict(feature, ROW_W=False, ADD_C=bool(normalize), HAS_SCALE=False),
                cf, key + ["ROW_W", "ADD_C", "HAS_SCALE"])
    # dv_j = dS^T phi(k_j): the apply kernel's product, with dS as the state
    dv = linear_attention_apply_triton(k, gs, gz, count, feature_map, False, eps, None, cu_seqlens_k, max_len_k,
                                       launch=launch)
    return dq, dk, dv

