"""Triton kernels of the linear-attention family (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Forward = split-sequence state reduction + apply, both bandwidth-bound (the FLUX-4K shape reads
q, k, v and writes o once: 0.38 ms at 4.27 TB/s):

1. ``_state_kernel``: grid (sequences x kv heads x Dv blocks, chunks). Each program reduces one
   chunk of the key sequence to a partial ``phi(k)^T v`` (D x Dv) and ``sum phi(k)``, accumulated
   in fp32. For fp16/bf16 inputs phi(k) is rounded once to the input dtype and multiplied with v
   by one tensor-core dot with fp32 accumulation (what FlashAttention does with P); the column
   sums of the same rounded phi(k) come from a second small dot with a ones column (numerator
   and denominator then see the same features; ``STATE_KS_BY_DOT``). The partials
   are added with fp32 atomics into a zeroed state (fast, not bitwise reproducible) unless
   ``torch.use_deterministic_algorithms(True)`` is on, in which case each chunk writes its own
   slot and a torch sum reduces them (deterministic).
2. ``_apply_kernel``: grid (sequences x heads x Dv blocks, chunks). Each program loads its fp32
   state once, scales it by 1/N and rounds it to the input dtype once, then streams its chunk of
   queries: one tensor-core dot per query block, the denominators ``phi(q).z`` from a second small
   dot (z split into hi + lo 16-bit parts, ~fp32 accuracy for the rounded phi(q) the numerator
   uses; ``APPLY_DEN_BY_DOT``) and one reciprocal per row.

The outputs are rounded to the input dtype, whose rounding (2^-8 for bf16) dominates the error of
the single-dot products (2^-9 relative on each term, averaged over D), so splitting operands into
hi + lo parts buys no accuracy that survives the output rounding (checked against the tests'
rule: error <= 2x the reference in the input dtype + atol). fp32 inputs use exact fp32 dots.

MEMO: ``_memory_kernel`` / ``_memory_update_kernel``, one program per (batch, head), the whole
(short) frame axis in registers: efficient for a huge batch of ~16-frame sequences.
``_memory_step_kernel`` computes both for one clip (the wrapper's default update), reading k, v
and the fp32 memory once instead of twice.

Backward: ``_grad_q_kernel`` (dq and the partial reductions of dS, dz over query chunks) and
``_grad_kv_kernel`` (dk, dv from the reduced dS, dz), both streaming a chunk of rows against a
state tile loaded once per program. Head dims whose whole D x Dv tiles would not fit on chip
(above 128) take the wide kernels instead (``_grad_rows_kernel``, ``_grad_s_wide_kernel``,
``_grad_feature_kernel`` and the apply kernel for dv), which read the states in Dv blocks.

Launch configurations: ``launch_configs(kernel, D, Dv, dtype, gpu)`` lists every configuration
(block sizes, num_warps, num_stages) a launcher may use; on a GPU the streaming kernels are
autotuned over that list (keyed on the head dims, dtype and flags), in the interpreter the first
one is used. tests/ops/linear/test_triton_compile.py compiles each of them for sm_80 and sm_90.

Last dims must be contiguous (the wrappers make them so); any strides on B, S, H.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

_FM = {"elu1": 0, "relu": 1, "identity": 2}


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: few programs keep it fast


@triton.jit
def _phi(x, FM: tl.constexpr):
    if FM == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FM == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FM: tl.constexpr):
    if FM == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FM == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _mm(a, b, acc, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b. LOWP: a and b are already in the (16-bit) input dtype, one tensor-core dot
    with fp32 accumulation; otherwise fp32 operands (exact fp32 products when IEEE)."""
    if LOWP:
        acc = tl.dot(a, b, acc)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_columns(x, dtype, LOWP: tl.constexpr):
    """An fp32 vector x as the columns of a (len(x), 16) dot operand whose row sums are x: for
    16-bit operands (LOWP) x = hi + lo in columns 0 and 1 (~16 mantissa bits), else x in column 0;
    the other columns are zero."""
    col = tl.arange(0, 16)[None, :]
    if LOWP:
        hi = x.to(dtype)
        lo = (x - hi.to(tl.float32)).to(dtype)
        return tl.where(col == 0, hi[:, None], tl.where(col == 1, lo[:, None], 0.0)).to(dtype)
    else:
        return tl.where(col == 0, x[:, None], 0.0)


@triton.jit
def _ld(ptrs, rmask, cmask, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """2-D load with only the masks that can be false (other = 0)."""
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _st(ptrs, x, rmask, cmask, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R:
        if MASK_C:
            tl.store(ptrs, x, mask=rmask[:, None] & cmask[None, :])
        else:
            tl.store(ptrs, x, mask=rmask[:, None])
    else:
        if MASK_C:
            tl.store(ptrs, x, mask=cmask[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def _chunk_range(CU, b, S, CHUNK, VARLEN: tl.constexpr):
    """[start, end) of this program's chunk (program axis 1) of sequence b: rows of the packed
    sequence cu_seqlens[b]..cu_seqlens[b+1] with VARLEN, else of [0, S). Empty when start >= end."""
    if VARLEN:
        seq_start = tl.load(CU + b).to(tl.int64)
        seq_end = tl.load(CU + b + 1).to(tl.int64)
    else:
        seq_start = 0
        seq_end = S
    start = seq_start + tl.program_id(1).to(tl.int64) * CHUNK
    return start, tl.minimum(start + CHUNK, seq_end)


@triton.jit
def _program_rows(CU, S, NH, NE, CHUNK, VARLEN: tl.constexpr):
    """A streaming program's (sequence, head, Dv block, first row, end row): grid axis 0 is
    sequences x NH heads x NE Dv blocks (Dv block fastest), axis 1 the row chunk (_chunk_range)."""
    pid = tl.program_id(0)
    pid_bh = pid // NE
    b = pid_bh // NH
    start, end = _chunk_range(CU, b, S, CHUNK, VARLEN)
    return b, pid_bh % NH, pid % NE, start, end


@triton.jit
def _seq_base(P, b, h, sb, sh, VARLEN: tl.constexpr):
    """P at sequence b, head h. Packed sequences (VARLEN) all live in batch row 0: their rows are
    addressed by _chunk_range's absolute positions."""
    base = P + h * sh
    if not VARLEN:
        base += b.to(tl.int64) * sb
    return base


# --------------------------------------------------------------------------------------------- forward


@triton.jit
def _state_step(kb, vb, s0, end, sks, svs, offs_d, offs_e, md, me, acc, ks,
                FM: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr, MASK_S: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, KS_DOT: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_s = s0 + tl.arange(0, BLOCK_S)
    ms = offs_s < end
    k = _ld(kb + offs_s[:, None] * sks + offs_d[None, :], ms, md, MASK_S, not EVEN_D)
    v = _ld(vb + offs_s[:, None] * svs + offs_e[None, :], ms, me, MASK_S, not EVEN_DV)
    fk = _phi(k.to(tl.float32), FM)
    if MASK_S:  # padded rows: v is 0 there, but phi(0) may not be (elu1)
        fk = tl.where(ms[:, None], fk, 0.0)
    if LOWP:
        fk_op = fk.to(k.dtype)
        acc = _mm(tl.trans(fk_op), v, acc, LOWP, IEEE)
    else:
        fk_op = fk
        acc = _mm(tl.trans(fk_op), v.to(tl.float32), acc, LOWP, IEEE)
    # (padded feature columns hold phi(0) in both sums; they are never stored)
    if KS_DOT:  # column sums as one more small dot: phi(k)^T @ e0, e0 = ones in column 0 of 16
        e0 = (tl.arange(0, BLOCK_S)[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)
        ks = _mm(tl.trans(fk_op), e0.to(fk_op.dtype), ks, LOWP, IEEE)
    else:       # a cross-thread reduction every step
        ks += tl.sum(fk, 0)
    return acc, ks


@triton.jit
def _state_kernel(K, V, CU, PKV, PKS,
                  skb, sks, skh, svb, svs, svh,
                  S, NSEQ, HKV, D, DV, NE, CHUNK,
                  FM: tl.constexpr, VARLEN: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr,
                  ATOMIC: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, KS_DOT: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_c = tl.program_id(1)
    b, h, pid_e, start, end = _program_rows(CU, S, HKV, NE, CHUNK, VARLEN)
    pid_bh = b * HKV + h
    kb = _seq_base(K, b, h, skb, skh, VARLEN)
    vb = _seq_base(V, b, h, svb, svh, VARLEN)
    n_full = (tl.maximum(end - start, 0) // BLOCK_S).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    acc = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    if KS_DOT:
        ks = tl.zeros((BLOCK_D, 16), tl.float32)
    else:
        ks = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, n_full):
        acc, ks = _state_step(kb, vb, start + i * BLOCK_S, end, sks, svs, offs_d, offs_e, md, me, acc, ks,
                               FM, LOWP, IEEE, False, EVEN_D, EVEN_DV, KS_DOT, BLOCK_S)
    tail = start + n_full * BLOCK_S
    if tail < end:
        acc, ks = _state_step(kb, vb, tail, end, sks, svs, offs_d, offs_e, md, me, acc, ks,
                               FM, LOWP, IEEE, True, EVEN_D, EVEN_DV, KS_DOT, BLOCK_S)
    if KS_DOT:
        ks = tl.sum(ks, 1)  # column 0 holds the sums, the others zeros
    if ATOMIC:  # into the zeroed (NSEQ, HKV, D, DV) state
        if start < end:
            slot = pid_bh.to(tl.int64)
            tl.atomic_add(PKV + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], acc,
                          mask=md[:, None] & me[None, :], sem="relaxed")
            if pid_e == 0:
                tl.atomic_add(PKS + slot * D + offs_d, ks, mask=md, sem="relaxed")
    else:  # own slot of the (chunks, NSEQ, HKV, D, DV) partials (zeros for an empty chunk)
        slot = pid_c.to(tl.int64) * NSEQ * HKV + pid_bh
        tl.store(PKV + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], acc, mask=md[:, None] & me[None, :])
        if pid_e == 0:
            tl.store(PKS + slot * D + offs_d, ks, mask=md)


@triton.jit
def _apply_step(qb, ob, s0, end, sqs, sos, offs_d, offs_e, md, me, kv, z, scale, eps,
                FM: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr, LOWP: tl.constexpr,
                IEEE: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                DEN_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_m = s0 + tl.arange(0, BLOCK_M)
    mm = offs_m < end
    q = _ld(qb + offs_m[:, None] * sqs + offs_d[None, :], mm, md, MASK_M, not EVEN_D)
    x = q.to(tl.float32)
    if HAS_SCALE:
        x = x * scale
    fq = _phi(x, FM)  # padded feature columns meet zero rows of the state and zero z
    out = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    if LOWP:
        fq_op = fq.to(q.dtype)
    else:
        fq_op = fq
    out = _mm(fq_op, kv, out, LOWP, IEEE)
    if NORMALIZE:
        if DEN_DOT:  # z is a (BLOCK_D, 16) matrix here (see _apply_kernel): phi(q).z as a small dot
            den = tl.sum(_mm(fq_op, z, tl.zeros((BLOCK_M, 16), tl.float32), LOWP, IEEE), 1)
        else:        # a cross-thread reduction per row
            den = tl.sum(fq * z[None, :], 1)
        rden = 1.0 / (den + eps)
        out = out * rden[:, None]
    _st(ob + offs_m[:, None] * sos + offs_e[None, :], out.to(ob.dtype.element_ty), mm, me, MASK_M, not EVEN_DV)


@triton.jit
def _apply_kernel(Q, KV, KS, CNT, O, CU,
                  sqb, sqs, sqh, sob, sos, soh,
                  S, H, HKV, D, DV, NE, CHUNK, NK, scale, eps,
                  FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_CNT: tl.constexpr,
                  LOWP: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                  DEN_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    b, h, pid_e, start, end = _program_rows(CU, S, H, NE, CHUNK, VARLEN)
    hk = h // (H // HKV)
    if start < end:
        qb = _seq_base(Q, b, h, sqb, sqh, VARLEN)
        ob = _seq_base(O, b, h, sob, soh, VARLEN)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
        md = offs_d < D
        me = offs_e < DV
        st = (b.to(tl.int64) * HKV + hk) * D
        kv = tl.load(KV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
        z = tl.load(KS + st + offs_d, mask=md, other=0.0)
        if NORMALIZE:  # S = kv_sum / N, z = k_sum / N
            if HAS_CNT:  # the state's key counts; else every sequence has NK keys
                inv_n = 1.0 / tl.maximum(tl.load(CNT + b), 1).to(tl.float32)
            else:
                inv_n = 1.0 / tl.maximum(NK, 1).to(tl.float32)
            kv = kv * inv_n
            z = z * inv_n
        if LOWP:
            kv = kv.to(Q.dtype.element_ty)  # rounded once per program
        if DEN_DOT:  # z as a (BLOCK_D, 16) dot operand
            z = _dot_columns(z, Q.dtype.element_ty, LOWP)
        n_full = (end - start) // BLOCK_M
        for i in range(0, n_full):
            _apply_step(qb, ob, start + i * BLOCK_M, end, sqs, sos, offs_d, offs_e, md, me, kv, z, scale, eps,
                        FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, False, EVEN_D, EVEN_DV, DEN_DOT, BLOCK_M, BLOCK_DV)
        tail = start + n_full * BLOCK_M
        if tail < end:
            _apply_step(qb, ob, tail, end, sqs, sos, offs_d, offs_e, md, me, kv, z, scale, eps,
                        FM, NORMALIZE, HAS_SCALE, LOWP, IEEE, True, EVEN_D, EVEN_DV, DEN_DOT, BLOCK_M, BLOCK_DV)

# --------------------------------------------------------------------------------------------- backward


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


# --------------------------------------------------------------------------------------------- MEMO


@triton.jit
def _memo_clip(K, V, pid_bh, pid_e, skb, sks, skh, svb, svs, svh, S, H, D, DV,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, LOWP: tl.constexpr):
    """One (sequence, head) clip of a MEMO program: its indices and masks, phi(k) = softmax of k
    over the frames (0 on padded frames and features) in float32 and v (0 where padded), in the
    input dtype with LOWP (a tensor-core operand), else float32."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    ms = offs_s < S
    md = offs_d < D
    me = offs_e < DV
    k = tl.load(K + b * skb + h * skh + offs_s[:, None] * sks + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0).to(tl.float32)
    k = tl.where(ms[:, None], k, float("-inf"))
    p = tl.exp(k - tl.max(k, 0)[None, :])
    fk = tl.where(md[None, :], p / tl.sum(p, 0)[None, :], 0.0)            # softmax over frames
    v = tl.load(V + b * svb + h * svh + offs_s[:, None] * svs + offs_e[None, :], mask=ms[:, None] & me[None, :],
                other=0.0)
    if not LOWP:
        v = v.to(tl.float32)
    return b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v


@triton.jit
def _memo_memory(MKV, MZ, st, offs_d, offs_e, md, me, DV, HAS_MEM: tl.constexpr):
    """This program's tile of the carried fp32 memory, (kv (BLOCK_D, BLOCK_DV), z (BLOCK_D,));
    unused placeholders without memory."""
    if HAS_MEM:
        mkv = tl.load(MKV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
        mz = tl.load(MZ + st + offs_d, mask=md, other=0.0)
    else:
        mkv = 0.0
        mz = 0.0
    return mkv, mz


@triton.jit
def _memo_out(Q, O, b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v, mkv, mz, sqb, sqs, sqh, sob, sos, soh,
              decay, qscale, HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """o = (phi(q) . KV) / max(phi(q) . Z, 1e-10) against the decayed memory, stored to O."""
    # 16-bit inputs (LOWP): both products on tensor cores (16-bit operands, fp32 accumulation). As
    # fp32 FMAs at these padded tiles they took 255 registers and ~1,000 FFMA per thread (ptxas), so
    # two 4-warp programs filled an SM (stop 7's H200 run: 10 % of the copy bandwidth).
    kv = _mm(tl.trans(fk.to(v.dtype)), v, tl.zeros((BLOCK_D, BLOCK_DV), tl.float32), LOWP, IEEE)
    z = tl.sum(fk, 0)
    if HAS_MEM:
        kv += decay * mkv
        z += decay * mz
    q = tl.load(Q + b * sqb + h * sqh + offs_s[:, None] * sqs + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0).to(tl.float32)
    q = tl.where(md[None, :], q, float("-inf"))
    pq = tl.exp(q - tl.max(q, 1)[:, None])
    fq = pq / tl.sum(pq, 1)[:, None] * qscale                              # softmax over features
    if LOWP:
        num = _mm(fq.to(Q.dtype.element_ty), kv.to(Q.dtype.element_ty), tl.zeros((BLOCK_S, BLOCK_DV), tl.float32),
                  LOWP, IEEE)
    else:
        num = _mm(fq, kv, tl.zeros((BLOCK_S, BLOCK_DV), tl.float32), LOWP, IEEE)
    den = tl.maximum(tl.sum(fq * z[None, :], 1), 1e-10)
    out = num / den[:, None]
    tl.store(O + b * sob + h * soh + offs_s[:, None] * sos + offs_e[None, :], out.to(O.dtype.element_ty),
             mask=ms[:, None] & me[None, :])


@triton.jit
def _memo_update_sums(offs_s, ms, fk, v, S, log2_decay, LOWP: tl.constexpr):
    """This clip's weighted sums of the new memory: sum_j (w_j phi(k_j)) (w_j v_j)^T and sum_j w_j phi(k_j)."""
    w = tl.where(ms, tl.exp2((S - 1 - offs_s).to(tl.float32) * log2_decay), 0.0)   # decay^(n-1-j)
    fk = fk * w[:, None]
    # (w_j phi(k_j)) (w_j v_j)^T = (w_j^2 phi(k_j)) v_j^T. The memory is carried from clip to clip in
    # fp32, so its product keeps fp32 accuracy: exact FMAs for fp32 inputs; for 16-bit ones three
    # TF32 tensor-core products (tf32x3), far fewer instructions and registers than FMAs.
    kv = tl.dot(tl.trans(fk * w[:, None]), v.to(tl.float32), input_precision="tf32x3" if LOWP else "ieee")
    return kv, tl.sum(fk, 0)


@triton.jit
def _memo_store_memory(NKV, NZ, st, offs_d, offs_e, md, me, kv, z, DV):
    tl.store(NKV + (st + offs_d[:, None]) * DV + offs_e[None, :], kv, mask=md[:, None] & me[None, :])
    if tl.program_id(1) == 0:
        tl.store(NZ + st + offs_d, z, mask=md)


@triton.jit
def _memory_kernel(Q, K, V, MKV, MZ, O,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                   S, H, D, DV, decay, qscale,
                   HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   LOWP: tl.constexpr, IEEE: tl.constexpr):
    b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v = _memo_clip(
        K, V, tl.program_id(0), tl.program_id(1), skb, sks, skh, svb, svs, svh, S, H, D, DV, BLOCK_S, BLOCK_D, BLOCK_DV,
        LOWP)
    mkv, mz = _memo_memory(MKV, MZ, (b * H + h) * D, offs_d, offs_e, md, me, DV, HAS_MEM)
    _memo_out(Q, O, b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v, mkv, mz, sqb, sqs, sqh, sob, sos, soh,
              decay, qscale, HAS_MEM, BLOCK_S, BLOCK_D, BLOCK_DV, LOWP, IEEE)


@triton.jit
def _memory_update_kernel(K, V, MKV, MZ, NKV, NZ,
                          skb, sks, skh, svb, svs, svh,
                          S, H, D, DV, log2_decay, decay_n,
                          HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
    b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v = _memo_clip(
        K, V, tl.program_id(0), tl.program_id(1), skb, sks, skh, svb, svs, svh, S, H, D, DV, BLOCK_S, BLOCK_D, BLOCK_DV,
        LOWP)
    kv, z = _memo_update_sums(offs_s, ms, fk, v, S, log2_decay, LOWP)
    st = (b * H + h) * D
    # Each memory load consumed at once (via _memo_memory: 141 instead of 121 registers at D = 40).
    if HAS_MEM:
        kv += decay_n * tl.load(MKV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :],
                                other=0.0)
        z += decay_n * tl.load(MZ + st + offs_d, mask=md, other=0.0)
    _memo_store_memory(NKV, NZ, st, offs_d, offs_e, md, me, kv, z, DV)


@triton.jit
def _memory_step_kernel(Q, K, V, MKV, MZ, O, NKV, NZ,
                        sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                        S, H, D, DV, NBH, decay, qscale, log2_decay, decay_n,
                        HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr, CLIPS: tl.constexpr):
    # _memory_kernel and _memory_update_kernel in one program: k, v and the memory tile read once.
    # The output first: the other order kept more tiles live (ptxas, bf16 sm_90, 4 warps: 178 vs 151
    # registers at D = 40, 136 B of spills vs none at D = 128).
    # CLIPS (sequence, head) clips per program, in a loop whose loads num_stages > 1 can prefetch: a
    # clip is a few KB, so one per program leaves every program waiting on its loads. Programs past
    # the last clip redo it (the same values written twice) rather than branch.
    for i in range(CLIPS):
        pid_bh = tl.minimum(tl.program_id(0) * CLIPS + i, NBH - 1)
        b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v = _memo_clip(
            K, V, pid_bh, tl.program_id(1), skb, sks, skh, svb, svs, svh, S, H, D, DV, BLOCK_S, BLOCK_D, BLOCK_DV,
            LOWP)
        st = (b * H + h) * D
        mkv, mz = _memo_memory(MKV, MZ, st, offs_d, offs_e, md, me, DV, HAS_MEM)
        _memo_out(Q, O, b, h, offs_s, offs_d, offs_e, ms, md, me, fk, v, mkv, mz, sqb, sqs, sqh, sob, sos, soh,
                  decay, qscale, HAS_MEM, BLOCK_S, BLOCK_D, BLOCK_DV, LOWP, IEEE)
        kv, z = _memo_update_sums(offs_s, ms, fk, v, S, log2_decay, LOWP)
        if HAS_MEM:
            kv += decay_n * mkv
            z += decay_n * mz
        _memo_store_memory(NKV, NZ, st, offs_d, offs_e, md, me, kv, z, DV)


# --------------------------------------------------------------------------------------------- launch configurations

# Streaming kernels: (rows per block, num_warps, num_stages) tried by the GPU autotuner, by the
# padded head dim (BLOCK_D <= 128 / 256). Every entry must fit the shared memory of sm_80 and sm_90
# (tests/ops/linear/test_triton_compile.py compiles them all).
_GPU_ROWS = {
    "state": {128: [(64, 8, 3), (64, 8, 4), (128, 8, 2), (64, 4, 3)],
              256: [(32, 8, 3), (64, 8, 2), (32, 4, 3)]},
    "apply": {128: [(128, 8, 2), (128, 8, 3), (64, 4, 3)],
              256: [(64, 8, 2), (64, 8, 3)]},
    "grad_q": {128: [(64, 8, 2), (64, 4, 2)]},
    "grad_kv": {128: [(64, 8, 2), (64, 4, 3)]},
    # head dims above backward_whole_tiles': Dv streamed in blocks (64 rows: wgmma needs 64 per
    # warpgroup)
    "grad_rows": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (64, 8, 3)]},
    "grad_s_wide": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (32, 8, 3)]},
    "grad_feature": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (64, 8, 3)]},
}
# The interpreter runs one fixed, small configuration.
_INTERP_ROWS = {"state": 64, "apply": 64, "grad_q": 32, "grad_kv": 32, "grad_rows": 32, "grad_s_wide": 32,
                "grad_feature": 32}
_ROW_NAME = {"state": "BLOCK_S", "apply": "BLOCK_M", "grad_q": "BLOCK_M", "grad_kv": "BLOCK_M",
             "grad_rows": "BLOCK_M", "grad_s_wide": "BLOCK_M", "grad_feature": "BLOCK_M"}
KERNELS = {"state": "_state_kernel", "apply": "_apply_kernel", "grad_q": "_grad_q_kernel",
           "grad_kv": "_grad_kv_kernel", "grad_rows": "_grad_rows_kernel", "grad_s_wide": "_grad_s_wide_kernel",
           "grad_feature": "_grad_feature_kernel", "memory": "_memory_kernel", "memory_update": "_memory_update_kernel",
           "memory_step": "_memory_step_kernel"}


# How the state kernel sums phi(k) over rows: True, as a second (D x 16) tensor-core dot beside the
# state's (no cross-thread work in the loop); False, a tl.sum across threads every step. Which is
# faster is for benchmarks/linear_sweep.py on a GPU to say (it times both).
STATE_KS_BY_DOT = True
# Programs per SM the streaming kernels split a sequence into: more give more parallelism, but the
# state kernel adds one more fp32 state per program with atomics and the apply kernel reads one
# more (FLUX-4K, D = 128: 64 KiB each, 4% of the forward's traffic at 4 per SM). H200,
# benchmarks/linear_sweep.py at 4027701: the forward takes 0.504 / 0.519 / 0.531 ms at 2 / 4 / 8
# (benchmarks/RESULTS.md); the sweep now times 1, 2 and 4.
PROGRAMS_PER_SM = 2
# Likewise the apply kernel's denominators phi(q).z: a small dot (z split hi + lo for 16-bit
# operands) or a per-row reduction across threads.
APPLY_DEN_BY_DOT = True
# How the state kernel's programs (several chunks per sequence) combine their sums: fp32 atomics
# into a zeroed state (a memset first; every program's adds land at once, at the end), or each
# program's own slot, summed by one torch reduction after (no memset, deterministic; always so
# under torch.use_deterministic_algorithms). benchmarks/linear_sweep.py times both.
STATE_ATOMIC = True


# (clips per program, num_warps, num_stages) of the MEMO step kernel that linear_sweep times
# against the default (1, 8, 1) at MEMO's D = 40: several clips per program, with loads prefetched
# a clip ahead (sm_90 ptxas at D <= 64: 181-249 registers, no spills; from D = 80 the 4-warp ones
# spill, and 2 warps lose wgmma).
MEMO_STEP_VARIANTS = [(4, 4, 2), (8, 4, 2), (16, 4, 3), (4, 8, 2), (16, 8, 3)]


def backward_whole_tiles(D: int, Dv: int) -> bool:
    """Whether the backward holds whole D x Dv tiles on chip (grad_q, grad_kv: q and g read once);
    above, the state streams in Dv blocks (grad_rows, grad_s_wide, grad_feature, and apply for dv)."""
    return _next_pow2(D) <= 128 and _next_pow2(Dv) <= 128


def launch_configs(kernel: str, D: int, Dv: int, dtype: torch.dtype = torch.bfloat16, gpu: bool = True,
                   frames: int = 16) -> list:
    """Every launch configuration the launcher of `kernel` (a key of KERNELS) may use for head dims
    D, Dv: dicts of the block-size constexprs plus num_warps and num_stages. On a GPU the list is
    what the autotuner chooses from (a single entry: used as is); in the interpreter one entry.
    `frames` is MEMO's sequence length (its whole frame axis is one block)."""
    BLOCK_D = _next_pow2(D)
    if kernel in ("memory", "memory_update", "memory_step"):
        # The step holds both kernels' fp32 tiles: 8 warps share them (4 warps: 151 registers at D = 40,
        # 255 at D = 128; 8: 119 and 174, no spills; a narrower BLOCK_DV would re-read q and k).
        cfg = dict(BLOCK_S=_next_pow2(frames), BLOCK_D=BLOCK_D, BLOCK_DV=min(_next_pow2(Dv), 64),
                   num_warps=8 if kernel == "memory_step" else 4, num_stages=1)
        if kernel == "memory_step":
            cfg["CLIPS"] = 1   # clips per program (benchmarks/linear_sweep.py times MEMO_STEP_VARIANTS)
        return [cfg]
    if kernel in ("state", "apply"):
        BLOCK_DV = min(_next_pow2(Dv), 64 if BLOCK_D > 128 else 128)
    elif kernel in ("grad_q", "grad_kv"):
        if not backward_whole_tiles(D, Dv):
            return []
        BLOCK_DV = _next_pow2(Dv)
    elif kernel in ("grad_rows", "grad_s_wide", "grad_feature"):
        if backward_whole_tiles(D, Dv):
            return []
        BLOCK_DV = min(_next_pow2(Dv), 64 if BLOCK_D > 128 else 128)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    rows = _ROW_NAME[kernel]
    if not gpu:
        return [{rows: _INTERP_ROWS[kernel], "BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "num_warps": 4,
                 "num_stages": 1}]
    table = _GPU_ROWS[kernel]
    entries = table[128] if BLOCK_D <= 128 else table[256]
    if dtype in (torch.float32, torch.float64):  # fp32 operands: twice the shared memory per tile
        entries = [(min(r, 32), w, min(s, 2)) for r, w, s in entries]
        entries = list(dict.fromkeys(entries))
    return [{rows: r, "BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "num_warps": w, "num_stages": s}
            for r, w, s in entries]


def even_flags(D: int, Dv: int, cfg: dict) -> dict:
    """The EVEN_D / EVEN_DV constexprs (no feature / value-column masks needed) for a config."""
    return dict(EVEN_D=D == cfg["BLOCK_D"], EVEN_DV=Dv % cfg["BLOCK_DV"] == 0)


_TUNED = {}


def _launch(name: str, kernel, grid, args: list, flags: dict, cfgs: list, key: list, reset_to_zero=None):
    """kernel[grid](*args, **flags) with the configuration(s) of `cfgs`: autotuned (keyed on `key`
    and the dtypes) when there are several, else the one given."""
    if len(cfgs) == 1:
        kernel[grid](*args, **flags, **cfgs[0])
        return
    ck = (name, tuple(tuple(sorted(c.items())) for c in cfgs))
    tuned = _TUNED.get(ck)
    if tuned is None:
        configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"],
                                 num_stages=c["num_stages"]) for c in cfgs]
        tuned = _TUNED[ck] = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(kernel)
    tuned[grid](*args, **flags)


# --------------------------------------------------------------------------------------------- launchers


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(dtype: torch.dtype):
    """(LOWP: 16-bit operands, IEEE: exact fp32 dots for fp32/fp64 inputs)."""
    lowp = dtype in (torch.float16, torch.bfloat16)
    return lowp, not lowp


def _flag_args(dtype: torch.dtype) -> dict:
    """_flags as the kernels' LOWP / IEEE constexpr arguments."""
    lowp, ieee = _flags(dtype)
    return dict(LOWP=lowp, IEEE=ieee)


def _new_output(shape, like, dtype=None):
    from ..._debug import new_output
    return new_output(shape, like=like, dtype=dtype)


def _seqs(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_len: Optional[int] = None):
    """(number of sequences, max length, cu pointer tensor or a dummy). A packed call's max length
    is read to the host (a device sync) unless the caller already did (max_len)."""
    if cu_seqlens is None:
        return x.shape[0], x.shape[1], x  # dummy pointer, never read
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu.numel() - 1, max_len, cu


def _chunking(n_seq_len: int, parallel: int, device):
    """(number of chunks, chunk length) splitting a sequence so that parallel x chunks programs
    fill the GPU (PROGRAMS_PER_SM per SM). GPU chunks are multiples of 128 rows (every block size divides them)
    and at least 512 rows; in the interpreter 32-row multiples, so that full blocks and tails,
    several chunks and the atomic reduction are all exercised by small tests."""
    n = max(int(n_seq_len), 1)
    if device.type == "cuda":
        align, target, min_chunk = 128, PROGRAMS_PER_SM * _num_sms(device), 512
    else:
        align, target, min_chunk = 32, 8, 32
    n_chunks = max(1, min(triton.cdiv(target, max(parallel, 1)), triton.cdiv(n, min_chunk)))
    chunk = triton.cdiv(triton.cdiv(n, n_chunks), align) * align
    return triton.cdiv(n, chunk), chunk


def linear_attention_state_triton(k, v, feature_map="elu1", cu_seqlens=None, count_tensor=True, max_len=None):
    """(kv_sum, k_sum, count); count_tensor=False (the fused forward): without cu_seqlens, count
    is the int S (no fill kernel). max_len: cu_seqlens' longest sequence, when already known."""
    k, v = _lastdim(k), _lastdim(v)
    B, S, Hkv, D = k.shape
    Dv = v.shape[-1]
    nseq, max_len, cu = _seqs(k, cu_seqlens, max_len)
    lowp, ieee = _flags(k.dtype)
    cfgs = launch_configs("state", D, Dv, k.dtype, k.device.type == "cuda")
    n_e = triton.cdiv(Dv, cfgs[0]["BLOCK_DV"])
    n_chunks, chunk = _chunking(max_len, nseq * Hkv * n_e, k.device)
    # Several chunks: fp32 atomics into a zeroed state (STATE_ATOMIC), unless deterministic
    # algorithms are requested.
    atomic = n_chunks > 1 and STATE_ATOMIC and not torch.are_deterministic_algorithms_enabled()
    f32 = dict(dtype=torch.float32, device=k.device)
    if atomic:  # both sums in one zeroed buffer: one memset launch
        zeros = torch.zeros(nseq * Hkv * D * (Dv + 1), **f32)
        pkv = zeros[:nseq * Hkv * D * Dv].view(nseq, Hkv, D, Dv)
        pks = zeros[nseq * Hkv * D * Dv:].view(nseq, Hkv, D)
    else:
        pkv, pks = torch.empty(n_chunks, nseq, Hkv, D, Dv, **f32), torch.empty(n_chunks, nseq, Hkv, D, **f32)
    if nseq * Hkv > 0:
        _launch("state", _state_kernel, (nseq * Hkv * n_e, n_chunks),
                [k, v, cu, pkv, pks, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                 S, nseq, Hkv, D, Dv, n_e, chunk],
                dict(FM=_FM[feature_map], VARLEN=cu_seqlens is not None, LOWP=lowp, IEEE=ieee, ATOMIC=atomic,
                     KS_DOT=STATE_KS_BY_DOT, **even_flags(D, Dv, cfgs[0])),
                cfgs, key=["D", "DV", "FM", "VARLEN", "ATOMIC"], reset_to_zero=["PKV", "PKS"])
    if atomic:
        kv_sum, k_sum = pkv, pks
    else:
        kv_sum = pkv[0] if n_chunks == 1 else pkv.sum(0)
        k_sum = pks[0] if n_chunks == 1 else pks.sum(0)
    if cu_seqlens is None:
        count = torch.full((B,), S, dtype=torch.int64, device=k.device) if count_tensor else S
    else:
        count = (cu[1:] - cu[:-1]).to(torch.int64)
    return kv_sum, k_sum, count


def linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map="elu1", normalize=True, eps=1e-4,
                                  scale=None, cu_seqlens=None, max_len=None):
    q = _lastdim(q)
    B, S, H, D = q.shape
    Hkv, Dv = kv_sum.shape[1], kv_sum.shape[3]
    kv_sum = kv_sum.to(torch.float32).contiguous()
    k_sum = k_sum.to(torch.float32).contiguous()
    has_cnt = not isinstance(count, int)   # an int: every sequence has that many keys
    count = count.contiguous() if has_cnt else count
    nseq, max_len, cu = _seqs(q, cu_seqlens, max_len)
    lowp, ieee = _flags(q.dtype)
    out = _new_output((B, S, H, Dv), q)
    cfgs = launch_configs("apply", D, Dv, q.dtype, q.device.type == "cuda")
    n_e = triton.cdiv(Dv, cfgs[0]["BLOCK_DV"])
    n_chunks, chunk = _chunking(max_len, nseq * H * n_e, q.device)
    if nseq * H > 0 and max_len > 0:
        _launch("apply", _apply_kernel, (nseq * H * n_e, n_chunks),
                [q, kv_sum, k_sum, count if has_cnt else kv_sum, out, cu, q.stride(0), q.stride(1), q.stride(2),
                 out.stride(0), out.stride(1), out.stride(2), S, H, Hkv, D, Dv, n_e, chunk,
                 0 if has_cnt else count, 1.0 if scale is None else float(scale), float(eps)],
                dict(FM=_FM[feature_map], VARLEN=cu_seqlens is not None, NORMALIZE=bool(normalize),
                     HAS_SCALE=scale is not None, HAS_CNT=has_cnt, LOWP=lowp, IEEE=ieee, DEN_DOT=APPLY_DEN_BY_DOT,
                     **even_flags(D, Dv, cfgs[0])),
                cfgs, key=["D", "DV", "FM", "VARLEN", "NORMALIZE"])
    return out


def linear_attention_triton(q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None, cu_seqlens=None,
                            cu_seqlens_k=None):
    """cu_seqlens packs q (and the output), cu_seqlens_k (default: cu_seqlens) packs k and v."""
    max_len, max_len_k = _max_lens(q, k, cu_seqlens, cu_seqlens_k)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_k, count_tensor=False,
                                                         max_len=max_len_k)
    return linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens,
                                         max_len=max_len)


def _max_lens(q, k, cu_seqlens, cu_seqlens_k):
    """The longest packed sequence of q and of k (None without cu_seqlens): one device sync for a
    shared packing, two for separate ones, however many kernels then use them."""
    if cu_seqlens is None:
        return None, None
    max_len = _seqs(q, cu_seqlens)[1]
    return max_len, max_len if cu_seqlens_k is None else _seqs(k, cu_seqlens_k)[1]


def linear_attention_backward_triton(grad_out, q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None,
                                     cu_seqlens=None, cu_seqlens_k=None):
    q, k, v, g = _lastdim(q), _lastdim(k), _lastdim(v), _lastdim(grad_out)
    B, Sq, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    lens = _max_lens(q, k, cu_seqlens, cu_seqlens_k)
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if not backward_whole_tiles(D, Dv):
        return _backward_wide(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, lens)
    # grad_q streams q's rows (cu_seqlens), grad_kv k's rows (cu_seqlens_k); both index the same
    # sequences, so the state and the reduced dS, dz are per sequence on either side.
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens_k, max_len=lens[1])
    nseq, max_len, cu = _seqs(q, cu_seqlens, lens[0])
    lowp, ieee = _flags(q.dtype)
    gpu = q.device.type == "cuda"
    fm = _FM[feature_map]
    varlen = cu_seqlens is not None
    cq = launch_configs("grad_q", D, Dv, q.dtype, gpu)
    even = even_flags(D, Dv, cq[0])
    n_chunks, chunk = _chunking(max_len, nseq * H, q.device)
    dq = _new_output(q.shape, like=q)
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
    dk = _new_output(k.shape, like=k)
    dv = _new_output(v.shape, like=v)
    _, max_len_k, cu_k = _seqs(k, cu_seqlens_k, lens[1])
    ckv = launch_configs("grad_kv", D, Dv, k.dtype, gpu)
    n_chunks_k, chunk_k = _chunking(max_len_k, nseq * Hkv, k.device)
    if nseq * Hkv > 0 and max_len_k > 0:
        _launch("grad_kv", _grad_kv_kernel, (nseq * Hkv, n_chunks_k),
                [k, v, gS, gz, dk, dv, cu_k, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                 v.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                 k.shape[1], Hkv, D, Dv, chunk_k],
                dict(FM=fm, VARLEN=varlen, NORMALIZE=bool(normalize), LOWP=lowp, IEEE=ieee, **even),
                ckv, key=["D", "DV", "FM", "VARLEN", "NORMALIZE"])
    return dq, dk, dv


def _backward_wide(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, lens):
    """The backward for head dims above backward_whole_tiles': each row's 1/den, gd, the q-side
    reduction of dS, dz, then dq, dk (_grad_feature_kernel) and dv (the apply kernel), with the
    D x Dv states read in Dv blocks. lens: _max_lens of the packings."""
    B, Sq, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens_k, max_len=lens[1])
    nseq, max_len, cu = _seqs(q, cu_seqlens, lens[0])
    lowp, ieee = _flags(q.dtype)
    op_dtype = q.dtype if lowp else torch.float32
    gpu = q.device.type == "cuda"
    fm = _FM[feature_map]
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
        cr = launch_configs("grad_rows", D, Dv, q.dtype, gpu)
        n_chunks, chunk = _chunking(max_len, nseq * H, q.device)
        _launch("grad_rows", _grad_rows_kernel, (nseq * H, n_chunks),
                [q, g, sl, z, w, cu, *q.stride()[:3], *g.stride()[:3], *w.stride()[:3],
                 Sq, H, Hkv, D, Dv, triton.cdiv(Dv, cr[0]["BLOCK_DV"]), chunk, scale_f, float(eps)],
                dict(flags, HAS_SCALE=scale is not None, **even_flags(D, Dv, cr[0])), cr, key)
    cs = launch_configs("grad_s_wide", D, Dv, q.dtype, gpu)
    n_e = triton.cdiv(Dv, cs[0]["BLOCK_DV"])
    n_chunks, chunk = _chunking(max_len, nseq * H * n_e, q.device)
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

    cf = launch_configs("grad_feature", D, Dv, q.dtype, gpu)
    n_e = triton.cdiv(Dv, cf[0]["BLOCK_DV"])
    feature = dict(flags, **even_flags(D, Dv, cf[0]))
    dq = _new_output(q.shape, like=q)
    n_chunks, chunk = _chunking(max_len, nseq * H, q.device)
    if nseq * H > 0 and max_len > 0:
        _launch("grad_feature", _grad_feature_kernel, (nseq * H, n_chunks),
                [g, q, sl, z, w, dq, cu, *g.stride()[:3], *q.stride()[:3], *dq.stride()[:3], *w.stride()[:3],
                 Sq, H, Hkv, D, Dv, n_e, chunk, scale_f],
                dict(feature, ROW_W=bool(normalize), ADD_C=False, HAS_SCALE=scale is not None),
                cf, key + ["ROW_W", "ADD_C", "HAS_SCALE"])
    dk = _new_output(k.shape, like=k)
    _, max_len_k, cu_k = _seqs(k, cu_seqlens_k, lens[1])
    n_chunks_k, chunk_k = _chunking(max_len_k, nseq * Hkv, k.device)
    if nseq * Hkv > 0 and max_len_k > 0:
        _launch("grad_feature", _grad_feature_kernel, (nseq * Hkv, n_chunks_k),
                [v, k, gs.to(op_dtype).contiguous(), gz, k, dk, cu_k, *v.stride()[:3], *k.stride()[:3],   # (W: unread)
                 *dk.stride()[:3], 0, 0, 0, k.shape[1], Hkv, Hkv, D, Dv, n_e, chunk_k, 1.0],
                dict(feature, ROW_W=False, ADD_C=bool(normalize), HAS_SCALE=False),
                cf, key + ["ROW_W", "ADD_C", "HAS_SCALE"])
    # dv_j = dS^T phi(k_j): the apply kernel's product, with dS as the state
    dv = linear_attention_apply_triton(k, gs, gz, count, feature_map, False, eps, None, cu_seqlens_k, max_len_k)
    return dq, dk, dv


def _memo_args(mem_kv, mem_z, placeholder):
    """(HAS_MEM, fp32 contiguous mem_kv, mem_z) for the MEMO kernels; without memory `placeholder`
    stands for the pointers, never read."""
    if mem_kv is None:
        return False, placeholder, placeholder
    return True, mem_kv.to(torch.float32).contiguous(), mem_z.to(torch.float32).contiguous()


def _decay_args(decay: float, S: int):
    """(log2 decay, decay^S) of the update kernels: w_j = exp2((S-1-j) log2 decay), 0 for decay = 0."""
    return math.log2(decay) if decay > 0 else -1e30, float(decay) ** S


def memory_linear_attention_triton(q, k, v, mem_kv=None, mem_z=None, decay=0.9):
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    out = _new_output((B, S, H, Dv), q)
    cfg = launch_configs("memory", D, Dv, q.dtype, q.device.type == "cuda", frames=S)[0]
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, q)
    if B * H > 0 and S > 0:
        _memory_kernel[(B * H, triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            q, k, v, mkv, mz, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S, H, D, Dv, float(decay), D ** -0.5, HAS_MEM=has_mem, **_flag_args(q.dtype),
            **cfg)
    return out


def memory_linear_attention_step_triton(q, k, v, mem_kv=None, mem_z=None, decay=0.9):
    """(out, new kv, new z) of one clip: memory_linear_attention_triton and
    memory_linear_attention_update_triton with the same k, v in one launch."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    out = _new_output((B, S, H, Dv), q)
    nkv = _new_output((B, H, D, Dv), like=k, dtype=torch.float32)
    nz = _new_output((B, H, D), like=k, dtype=torch.float32)
    cfg = launch_configs("memory_step", D, Dv, q.dtype, q.device.type == "cuda", frames=S)[0]
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, nkv)
    if B * H > 0:
        if S == 0:  # no frames: the memory unchanged (decay^0), out is empty
            return (out, mkv.clone(), mz.clone()) if has_mem else (out, nkv.zero_(), nz.zero_())
        _memory_step_kernel[(triton.cdiv(B * H, cfg["CLIPS"]), triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            q, k, v, mkv, mz, out, nkv, nz, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S, H, D, Dv, B * H, float(decay), D ** -0.5, *_decay_args(decay, S), HAS_MEM=has_mem,
            **_flag_args(q.dtype), **cfg)
    return out, nkv, nz


def memory_linear_attention_update_triton(k, v, mem_kv=None, mem_z=None, decay=0.9):
    k, v = _lastdim(k), _lastdim(v)
    B, S, H, D = k.shape
    Dv = v.shape[-1]
    nkv = _new_output((B, H, D, Dv), like=k, dtype=torch.float32)
    nz = _new_output((B, H, D), like=k, dtype=torch.float32)
    cfg = launch_configs("memory_update", D, Dv, k.dtype, k.device.type == "cuda", frames=S)[0]
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, nkv)
    if B * H > 0:
        if S == 0:
            return (mkv.clone(), mz.clone()) if has_mem else (nkv.zero_(), nz.zero_())
        _memory_update_kernel[(B * H, triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            k, v, mkv, mz, nkv, nz, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            S, H, D, Dv, *_decay_args(decay, S), HAS_MEM=has_mem, **_flag_args(k.dtype),
            **cfg)
    return nkv, nz
