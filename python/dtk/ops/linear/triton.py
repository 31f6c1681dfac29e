"""Triton kernels of the linear-attention family (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Forward = split-sequence state reduction + apply, both bandwidth-bound:

1. ``_state_kernel``: grid (chunks, sequences x kv heads, Dv blocks). Each program reduces one
   chunk of the key sequence to a partial ``phi(k)^T v`` (D x Dv) and ``sum phi(k)`` in fp32 with
   tensor-core dots (phi(k) split into a hi and a lo part of the input dtype, so the product is
   ~fp32-exact); the partials (chunks, ...) are summed by a second (tiny) reduction.
2. ``_apply_kernel``: grid (query blocks, sequences x heads, Dv blocks). Reads the fp32 state once
   per program (split hi/lo for the tensor-core dot), the denominator ``phi(q).z`` in fp32.

MEMO: ``_memory_kernel`` / ``_memory_update_kernel``, one program per (batch, head), the whole
(short) frame axis in registers: efficient for a huge batch of ~16-frame sequences.

Backward: ``_grad_q_kernel`` (dq and the partial reductions of dS, dz over query chunks) and
``_grad_kv_kernel`` (dk, dv from the reduced dS, dz).

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


def _interpret() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _dot_split(a32, b, acc, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a32 @ b with a32 fp32 and b in the input dtype: a32 is split into hi + lo parts of b's
    dtype so two tensor-core dots give ~fp32 accuracy."""
    if LOWP:
        hi = a32.to(b.dtype)
        lo = (a32 - hi.to(tl.float32)).to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    elif IEEE:
        acc = tl.dot(a32, b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a32, b.to(tl.float32), acc)
    return acc


@triton.jit
def _dot_split_b(a, b32, acc, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b32 with a in the input dtype and b32 fp32 (split into hi + lo)."""
    if LOWP:
        hi = b32.to(a.dtype)
        lo = (b32 - hi.to(tl.float32)).to(a.dtype)
        acc = tl.dot(a, hi, acc)
        acc = tl.dot(a, lo, acc)
    elif IEEE:
        acc = tl.dot(a.to(tl.float32), b32, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.float32), b32, acc)
    return acc


@triton.jit
def _seq_range(CU, b, S, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        end = tl.load(CU + b + 1).to(tl.int64)
    else:
        start = 0
        end = S
    return start, end


@triton.jit
def _state_kernel(K, V, CU, PKV, PKS,
                  skb, sks, skh, svb, svs, svh,
                  S, NSEQ, HKV, D, DV, CHUNK,
                  FM: tl.constexpr, VARLEN: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seq_start, seq_end = _seq_range(CU, b, S, VARLEN)
    if VARLEN:
        kb = K + h * skh
        vb = V + h * svh
    else:
        kb = K + b.to(tl.int64) * skb + h * skh
        vb = V + b.to(tl.int64) * svb + h * svh
    start = seq_start + pid_c.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, seq_end)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    acc = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    ks = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < end
        k = tl.load(kb + offs_s[:, None] * sks + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        fk = tl.where(ms[:, None] & md[None, :], _phi(k.to(tl.float32), FM), 0.0)
        v = tl.load(vb + offs_s[:, None] * svs + offs_e[None, :], mask=ms[:, None] & me[None, :], other=0.0)
        acc = _dot_split(tl.trans(fk), v, acc, LOWP, IEEE)
        ks += tl.sum(fk, 0)
    slot = pid_c.to(tl.int64) * NSEQ * HKV + pid_bh
    tl.store(PKV + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], acc, mask=md[:, None] & me[None, :])
    if pid_e == 0:
        tl.store(PKS + slot * D + offs_d, ks, mask=md)


@triton.jit
def _apply_kernel(Q, KV, KS, CNT, O, CU,
                  sqb, sqs, sqh, sob, sos, soh,
                  S, H, HKV, D, DV, scale, eps,
                  FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr,
                  LOWP: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HKV)
    seq_start, seq_end = _seq_range(CU, b, S, VARLEN)
    if VARLEN:
        qb = Q + h * sqh
        ob = O + h * soh
    else:
        qb = Q + b.to(tl.int64) * sqb + h * sqh
        ob = O + b.to(tl.int64) * sob + h * soh
    offs_m = seq_start + pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < seq_end
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    q = tl.load(qb + offs_m[:, None] * sqs + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    fq = tl.where(md[None, :], _phi(q.to(tl.float32) * scale, FM), 0.0)
    st = (b.to(tl.int64) * HKV + hk) * D
    kv = tl.load(KV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
    out = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    out = _dot_split_b(fq.to(q.dtype), kv, out, LOWP, IEEE)
    if NORMALIZE:
        n = tl.maximum(tl.load(CNT + b), 1).to(tl.float32)
        z = tl.load(KS + st + offs_d, mask=md, other=0.0)
        den = tl.sum(fq * z[None, :], 1) / n + eps
        out = out / n / den[:, None]
    tl.store(ob + offs_m[:, None] * sos + offs_e[None, :], out.to(O.dtype.element_ty), mask=mm[:, None] & me[None, :])


@triton.jit
def _grad_q_kernel(Q, G, KV, KS, CNT, DQ, PGS, PGZ, CU,
                   sqb, sqs, sqh, sgb, sgs, sgh, sdb, sds, sdh,
                   S, NSEQ, H, HKV, D, DV, CHUNK, scale, eps,
                   FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr,
                   LOWP: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (query chunk, sequence x head): dq for its rows, and its partial
    dS = sum_i phi(q_i)^T ga_i (D x Dv) and dz = sum_i phi(q_i) gd_i (already divided by N)."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HKV)
    seq_start, seq_end = _seq_range(CU, b, S, VARLEN)
    if VARLEN:
        qb = Q + h * sqh
        gb = G + h * sgh
        db = DQ + h * sdh
    else:
        qb = Q + b.to(tl.int64) * sqb + h * sqh
        gb = G + b.to(tl.int64) * sgb + h * sgh
        db = DQ + b.to(tl.int64) * sdb + h * sdh
    start = seq_start + pid_c.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, seq_end)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    st = (b.to(tl.int64) * HKV + hk) * D
    kv = tl.load(KV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
    if NORMALIZE:
        n = tl.maximum(tl.load(CNT + b), 1).to(tl.float32)
        kv = kv / n
        z = tl.load(KS + st + offs_d, mask=md, other=0.0) / n
    gS = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    gz = tl.zeros((BLOCK_D,), tl.float32)
    kvt = tl.trans(kv)
    for s0 in range(start, end, BLOCK_M):
        offs_m = s0 + tl.arange(0, BLOCK_M)
        mm = offs_m < end
        q = tl.load(qb + offs_m[:, None] * sqs + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        qs = q.to(tl.float32) * scale
        fq = tl.where(mm[:, None] & md[None, :], _phi(qs, FM), 0.0)
        g = tl.load(gb + offs_m[:, None] * sgs + offs_e[None, :], mask=mm[:, None] & me[None, :], other=0.0)
        g32 = g.to(tl.float32)
        if NORMALIZE:
            num = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
            num = _dot_split_b(fq.to(q.dtype), kv, num, LOWP, IEEE)
            den = tl.sum(fq * z[None, :], 1) + eps
            o = num / den[:, None]
            ga = g32 / den[:, None]
            gd = -tl.sum(g32 * o, 1) / den
        else:
            ga = g32
        gfq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        gfq = _dot_split_b(ga.to(g.dtype), kvt, gfq, LOWP, IEEE)
        if LOWP:  # the lo part of ga
            gfq = _dot_split_b((ga - ga.to(g.dtype).to(tl.float32)).to(g.dtype), kvt, gfq, LOWP, IEEE)
        if NORMALIZE:
            gfq += gd[:, None] * z[None, :]
            gz += tl.sum(fq * gd[:, None], 0)
        dq = gfq * _dphi(qs, FM) * scale
        tl.store(db + offs_m[:, None] * sds + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mm[:, None] & md[None, :])
        gS = _dot_split(tl.trans(fq), ga.to(g.dtype), gS, LOWP, IEEE)
        if LOWP:
            gS = _dot_split(tl.trans(fq), (ga - ga.to(g.dtype).to(tl.float32)).to(g.dtype), gS, LOWP, IEEE)
    slot = pid_c.to(tl.int64) * NSEQ * H + pid_bh
    if NORMALIZE:
        gS = gS / n
        gz = gz / n
    tl.store(PGS + (slot * D + offs_d[:, None]) * DV + offs_e[None, :], gS, mask=md[:, None] & me[None, :])
    tl.store(PGZ + slot * D + offs_d, gz, mask=md)


@triton.jit
def _grad_kv_kernel(K, V, GS, GZ, DK, DV_, CU,
                    skb, sks, skh, svb, svs, svh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
                    S, HKV, D, DV,
                    FM: tl.constexpr, VARLEN: tl.constexpr, NORMALIZE: tl.constexpr,
                    LOWP: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk_j = phi'(k_j) (dS v_j + dz), dv_j = dS^T phi(k_j) with dS, dz reduced over the group."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seq_start, seq_end = _seq_range(CU, b, S, VARLEN)
    if VARLEN:
        kb = K + h * skh
        vb = V + h * svh
        dkb = DK + h * sdkh
        dvb = DV_ + h * sdvh
    else:
        kb = K + b.to(tl.int64) * skb + h * skh
        vb = V + b.to(tl.int64) * svb + h * svh
        dkb = DK + b.to(tl.int64) * sdkb + h * sdkh
        dvb = DV_ + b.to(tl.int64) * sdvb + h * sdvh
    offs_m = seq_start + pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < seq_end
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    st = (b.to(tl.int64) * HKV + h) * D
    gS = tl.load(GS + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :], other=0.0)
    k = tl.load(kb + offs_m[:, None] * sks + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    k32 = k.to(tl.float32)
    fk = tl.where(md[None, :], _phi(k32, FM), 0.0)
    v = tl.load(vb + offs_m[:, None] * svs + offs_e[None, :], mask=mm[:, None] & me[None, :], other=0.0)
    gfk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    gfk = _dot_split_b(v, tl.trans(gS), gfk, LOWP, IEEE)
    if NORMALIZE:
        gz = tl.load(GZ + st + offs_d, mask=md, other=0.0)
        gfk += gz[None, :]
    dk = gfk * _dphi(k32, FM)
    gv = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    gv = _dot_split_b(fk.to(k.dtype), gS, gv, LOWP, IEEE)
    if LOWP:
        gv = _dot_split_b((fk - fk.to(k.dtype).to(tl.float32)).to(k.dtype), gS, gv, LOWP, IEEE)
    tl.store(dkb + offs_m[:, None] * sdks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mm[:, None] & md[None, :])
    tl.store(dvb + offs_m[:, None] * sdvs + offs_e[None, :], gv.to(DV_.dtype.element_ty), mask=mm[:, None] & me[None, :])


@triton.jit
def _memory_kernel(Q, K, V, MKV, MZ, O,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                   S, H, D, DV, decay, qscale,
                   HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
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
                other=0.0).to(tl.float32)
    kv = tl.dot(tl.trans(fk), v, input_precision="ieee")
    z = tl.sum(fk, 0)
    if HAS_MEM:
        st = (b * H + h) * D
        kv += decay * tl.load(MKV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :],
                              other=0.0)
        z += decay * tl.load(MZ + st + offs_d, mask=md, other=0.0)
    q = tl.load(Q + b * sqb + h * sqh + offs_s[:, None] * sqs + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0).to(tl.float32)
    q = tl.where(md[None, :], q, float("-inf"))
    pq = tl.exp(q - tl.max(q, 1)[:, None])
    fq = pq / tl.sum(pq, 1)[:, None] * qscale                              # softmax over features
    num = tl.dot(fq, kv, input_precision="ieee")
    den = tl.maximum(tl.sum(fq * z[None, :], 1), 1e-10)
    out = num / den[:, None]
    tl.store(O + b * sob + h * soh + offs_s[:, None] * sos + offs_e[None, :], out.to(O.dtype.element_ty),
             mask=ms[:, None] & me[None, :])


@triton.jit
def _memory_update_kernel(K, V, MKV, MZ, NKV, NZ,
                          skb, sks, skh, svb, svs, svh,
                          S, H, D, DV, log2_decay, decay_n,
                          HAS_MEM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    ms = offs_s < S
    md = offs_d < D
    me = offs_e < DV
    w = tl.exp2((S - 1 - offs_s).to(tl.float32) * log2_decay)             # decay^(n-1-j)
    w = tl.where(ms, w, 0.0)
    k = tl.load(K + b * skb + h * skh + offs_s[:, None] * sks + offs_d[None, :], mask=ms[:, None] & md[None, :],
                other=0.0).to(tl.float32)
    k = tl.where(ms[:, None], k, float("-inf"))
    p = tl.exp(k - tl.max(k, 0)[None, :])
    fk = tl.where(md[None, :], p / tl.sum(p, 0)[None, :], 0.0) * w[:, None]
    v = tl.load(V + b * svb + h * svh + offs_s[:, None] * svs + offs_e[None, :], mask=ms[:, None] & me[None, :],
                other=0.0).to(tl.float32) * w[:, None]
    kv = tl.dot(tl.trans(fk), v, input_precision="ieee")
    z = tl.sum(fk, 0)
    st = (b * H + h) * D
    if HAS_MEM:
        kv += decay_n * tl.load(MKV + (st + offs_d[:, None]) * DV + offs_e[None, :], mask=md[:, None] & me[None, :],
                                other=0.0)
        z += decay_n * tl.load(MZ + st + offs_d, mask=md, other=0.0)
    tl.store(NKV + (st + offs_d[:, None]) * DV + offs_e[None, :], kv, mask=md[:, None] & me[None, :])
    if pid_e == 0:
        tl.store(NZ + st + offs_d, z, mask=md)


# --------------------------------------------------------------------------------------------- launchers


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(dtype: torch.dtype):
    lowp = dtype in (torch.float16, torch.bfloat16)
    return lowp, dtype == torch.float32


def _new_output(shape, like, dtype=None):
    from ..._debug import new_output
    return new_output(shape, like=like, dtype=dtype)


def _seqs(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(number of sequences, max length, cu pointer tensor or a dummy)."""
    if cu_seqlens is None:
        return x.shape[0], x.shape[1], x  # dummy pointer, never read
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu.numel() - 1, max_len, cu


def _chunking(n_seq_len: int, parallel: int, device, block: int):
    target = 4 * _num_sms(device)
    n_chunks = max(1, min(triton.cdiv(target, max(parallel, 1)), triton.cdiv(max(n_seq_len, 1), block)))
    chunk = triton.cdiv(triton.cdiv(max(n_seq_len, 1), n_chunks), block) * block
    return triton.cdiv(max(n_seq_len, 1), chunk), chunk


def _block_dv(D: int, Dv: int, lowp: bool) -> int:
    bd = _next_pow2(D)
    return min(_next_pow2(Dv), 64 if bd > 128 else 128)


def linear_attention_state_triton(k, v, feature_map="elu1", cu_seqlens=None):
    k, v = _lastdim(k), _lastdim(v)
    B, S, Hkv, D = k.shape
    Dv = v.shape[-1]
    nseq, max_len, cu = _seqs(k, cu_seqlens)
    lowp, ieee = _flags(k.dtype)
    BLOCK_D = _next_pow2(D)
    BLOCK_DV = _block_dv(D, Dv, lowp)
    BLOCK_S = 64
    n_e = triton.cdiv(Dv, BLOCK_DV)
    n_chunks, chunk = _chunking(max_len, nseq * Hkv * n_e, k.device, BLOCK_S)
    pkv = torch.empty(n_chunks, nseq, Hkv, D, Dv, dtype=torch.float32, device=k.device)
    pks = torch.empty(n_chunks, nseq, Hkv, D, dtype=torch.float32, device=k.device)
    if nseq * Hkv > 0:
        _state_kernel[(n_chunks, nseq * Hkv, n_e)](
            k, v, cu, pkv, pks, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            S, nseq, Hkv, D, Dv, chunk, FM=_FM[feature_map], VARLEN=cu_seqlens is not None, LOWP=lowp, IEEE=ieee,
            BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=8 if BLOCK_D * BLOCK_DV >= 128 * 128 else 4)
    kv_sum = pkv[0] if n_chunks == 1 else pkv.sum(0)
    k_sum = pks[0] if n_chunks == 1 else pks.sum(0)
    if cu_seqlens is None:
        count = torch.full((B,), S, dtype=torch.int64, device=k.device)
    else:
        count = (cu[1:] - cu[:-1]).to(torch.int64)
    return kv_sum, k_sum, count


def linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map="elu1", normalize=True, eps=1e-4,
                                  scale=None, cu_seqlens=None):
    q = _lastdim(q)
    B, S, H, D = q.shape
    Hkv, Dv = kv_sum.shape[1], kv_sum.shape[3]
    kv_sum = kv_sum.to(torch.float32).contiguous()
    k_sum = k_sum.to(torch.float32).contiguous()
    count = count.contiguous()
    nseq, max_len, cu = _seqs(q, cu_seqlens)
    lowp, ieee = _flags(q.dtype)
    out = _new_output((B, S, H, Dv), q)
    BLOCK_D = _next_pow2(D)
    BLOCK_DV = _block_dv(D, Dv, lowp)
    BLOCK_M = 128 if BLOCK_D <= 128 else 32  # 128 rows per state read keeps the L2 traffic low
    grid = (triton.cdiv(max(max_len, 1), BLOCK_M), nseq * H, triton.cdiv(Dv, BLOCK_DV))
    if nseq * H > 0 and max_len > 0:
        _apply_kernel[grid](
            q, kv_sum, k_sum, count, out, cu, q.stride(0), q.stride(1), q.stride(2),
            out.stride(0), out.stride(1), out.stride(2), S, H, Hkv, D, Dv,
            1.0 if scale is None else float(scale), float(eps), FM=_FM[feature_map],
            VARLEN=cu_seqlens is not None, NORMALIZE=bool(normalize), LOWP=lowp, IEEE=ieee,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=8 if BLOCK_M * BLOCK_D >= 128 * 128 else 4)
    return out


def linear_attention_triton(q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None, cu_seqlens=None):
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens)
    return linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens)


def linear_attention_backward_triton(grad_out, q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None,
                                     cu_seqlens=None):
    q, k, v, g = _lastdim(q), _lastdim(k), _lastdim(v), _lastdim(grad_out)
    B, Sq, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    if _next_pow2(D) * _next_pow2(Dv) > 128 * 128:  # whole D x Dv tiles would not fit on chip
        return _backward_torch(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens)
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_seqlens)
    nseq, max_len, cu = _seqs(q, cu_seqlens)
    lowp, ieee = _flags(q.dtype)
    BLOCK_D = _next_pow2(D)
    BLOCK_DV = _next_pow2(Dv)
    BLOCK_M = 32 if BLOCK_D * BLOCK_DV > 128 * 128 else 64
    fm = _FM[feature_map]
    n_chunks, chunk = _chunking(max_len, nseq * H, q.device, BLOCK_M)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    pgs = torch.empty(n_chunks, nseq, H, D, Dv, dtype=torch.float32, device=q.device)
    pgz = torch.zeros(n_chunks, nseq, H, D, dtype=torch.float32, device=q.device)
    nw = 8 if BLOCK_D * BLOCK_DV >= 128 * 128 else 4
    if nseq * H > 0:
        _grad_q_kernel[(n_chunks, nseq * H)](
            q, g, kv_sum, k_sum, count, dq, pgs, pgz, cu, q.stride(0), q.stride(1), q.stride(2),
            g.stride(0), g.stride(1), g.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            Sq, nseq, H, Hkv, D, Dv, chunk, 1.0 if scale is None else float(scale), float(eps),
            FM=fm, VARLEN=cu_seqlens is not None, NORMALIZE=bool(normalize), LOWP=lowp, IEEE=ieee,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=nw)
    gS = pgs.sum(0).view(nseq, Hkv, H // max(Hkv, 1), D, Dv).sum(2).contiguous()
    gz = pgz.sum(0).view(nseq, Hkv, H // max(Hkv, 1), D).sum(2).contiguous()
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _, max_len_k, _ = _seqs(k, cu_seqlens)
    if nseq * Hkv > 0 and max_len_k > 0:
        _grad_kv_kernel[(triton.cdiv(max_len_k, BLOCK_M), nseq * Hkv)](
            k, v, gS, gz, dk, dv, cu, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            k.shape[1], Hkv, D, Dv, FM=fm, VARLEN=cu_seqlens is not None, NORMALIZE=bool(normalize),
            LOWP=lowp, IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=nw)
    return dq, dk, dv


def _backward_torch(g, q, k, v, feature_map, normalize, eps, scale, cu_seqlens):
    """fp32 PyTorch backward (recomputes the forward under autograd), used for head dims above 128."""
    from .reference import linear_attention_reference
    with torch.enable_grad():
        ts = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = linear_attention_reference(*ts, feature_map=feature_map, normalize=normalize, eps=eps, scale=scale,
                                         cu_seqlens=cu_seqlens)
        grads = torch.autograd.grad(out, ts, g.float())
    return tuple(gr.to(t.dtype) for gr, t in zip(grads, (q, k, v)))


def memory_linear_attention_triton(q, k, v, mem_kv=None, mem_z=None, decay=0.9):
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    out = _new_output((B, S, H, Dv), q)
    BLOCK_S, BLOCK_D = _next_pow2(S), _next_pow2(D)
    BLOCK_DV = min(_next_pow2(Dv), 64)
    has_mem = mem_kv is not None
    mkv = mem_kv.to(torch.float32).contiguous() if has_mem else q
    mz = mem_z.to(torch.float32).contiguous() if has_mem else q
    if B * H > 0 and S > 0:
        _memory_kernel[(B * H, triton.cdiv(Dv, BLOCK_DV))](
            q, k, v, mkv, mz, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S, H, D, Dv, float(decay), D ** -0.5, HAS_MEM=has_mem,
            BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=4)
    return out


def memory_linear_attention_update_triton(k, v, mem_kv=None, mem_z=None, decay=0.9):
    k, v = _lastdim(k), _lastdim(v)
    B, S, H, D = k.shape
    Dv = v.shape[-1]
    nkv = torch.empty(B, H, D, Dv, dtype=torch.float32, device=k.device)
    nz = torch.empty(B, H, D, dtype=torch.float32, device=k.device)
    BLOCK_S, BLOCK_D = _next_pow2(S), _next_pow2(D)
    BLOCK_DV = min(_next_pow2(Dv), 64)
    has_mem = mem_kv is not None
    mkv = mem_kv.to(torch.float32).contiguous() if has_mem else nkv
    mz = mem_z.to(torch.float32).contiguous() if has_mem else nz
    if B * H > 0:
        if S == 0:
            return (mkv.clone(), mz.clone()) if has_mem else (nkv.zero_(), nz.zero_())
        _memory_update_kernel[(B * H, triton.cdiv(Dv, BLOCK_DV))](
            k, v, mkv, mz, nkv, nz, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            S, H, D, Dv, math.log2(decay) if decay > 0 else -1e30, float(decay) ** S, HAS_MEM=has_mem,
            BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=4)
    return nkv, nz
