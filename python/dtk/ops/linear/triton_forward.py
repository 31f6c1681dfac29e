"""Forward Triton kernels of the linear-attention family (GPU; CPU tensors under
``TRITON_INTERPRET=1``) and their launchers. Forward = split-sequence state reduction + apply,
both bandwidth-bound (benchmarks/RESULTS.md has the measured times against a copy of the same bytes):

1. ``_state_kernel``: grid (sequences x kv heads x Dv blocks, chunks). Each program reduces one
   chunk of the key sequence to a partial ``phi(k)^T v`` (D x Dv) and ``sum phi(k)``, accumulated
   in fp32. For fp16/bf16 inputs phi(k) is rounded once to the input dtype and multiplied with v
   by one tensor-core dot with fp32 accumulation (what FlashAttention does with P); the column
   sums of the same rounded phi(k) come from a second small dot with a ones column (numerator
   and denominator then see the same features; ``Launch.ks_dot``). The partials are added with
   fp32 atomics into a zeroed state (fast, not bitwise reproducible; ``Launch.atomic``) unless
   ``torch.use_deterministic_algorithms(True)`` is on, in which case each chunk writes its own
   slot and a torch sum reduces them (deterministic).
2. ``_apply_kernel``: grid (sequences x heads x Dv blocks, chunks). Each program loads its fp32
   state once, scales it by 1/N and rounds it to the input dtype once, then streams its chunk of
   queries: one tensor-core dot per query block, the denominators ``phi(q).z`` from a second small
   dot (z split into hi + lo 16-bit parts, ~fp32 accuracy for the rounded phi(q) the numerator
   uses; ``Launch.den_dot``) and one reciprocal per row.

The outputs are rounded to the input dtype, whose rounding (2^-8 for bf16) dominates the error of
the single-dot products (2^-9 relative on each term, averaged over D), so splitting operands into
hi + lo parts buys no accuracy that survives the output rounding (checked against the tests' rule,
docs/testing.md). fp32 inputs use exact fp32 dots.

The launchers take their launch parameters (``launch.Launch``) from ``engine.py``; they decide nothing.
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
from .triton_common import FEATURE_MAP_IDS, _dot_columns, _ld, _phi, _program_rows, _seq_base, _st


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

# --------------------------------------------------------------------------------------------- launchers


def linear_attention_state_triton(k, v, feature_map="elu1", cu_seqlens=None, *, launch: Launch, count_tensor=True,
                                  max_len=None):
    """(kv_sum, k_sum, count); count_tensor=False (the fused forward): without cu_seqlens, count
    is the int S (no fill kernel). max_len: cu_seqlens' longest sequence, when already known."""
    k, v = lastdim(k), lastdim(v)
    B, S, Hkv, D = k.shape
    Dv = v.shape[-1]
    nseq, max_len, cu = common.seqs(k, cu_seqlens, max_len)
    lowp, ieee = dtype_flags(k.dtype)
    cfgs = launch.candidates("state", D, Dv, k.dtype, k.device.type == "cuda")
    n_e = triton.cdiv(Dv, cfgs[0]["BLOCK_DV"])
    n_chunks, chunk = chunking(max_len, nseq * Hkv * n_e, k.device, launch.programs_per_sm)
    # Several chunks: fp32 atomics into a zeroed state (launch.atomic), unless deterministic
    # algorithms are requested.
    atomic = n_chunks > 1 and launch.atomic and not torch.are_deterministic_algorithms_enabled()
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
                dict(FM=FEATURE_MAP_IDS[feature_map], VARLEN=cu_seqlens is not None, LOWP=lowp, IEEE=ieee,
                     ATOMIC=atomic, KS_DOT=launch.ks_dot, **even_flags(D, Dv, cfgs[0])),
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
                                  scale=None, cu_seqlens=None, max_len=None, *, launch: Launch):
    q = lastdim(q)
    B, S, H, D = q.shape
    Hkv, Dv = kv_sum.shape[1], kv_sum.shape[3]
    kv_sum = kv_sum.to(torch.float32).contiguous()
    k_sum = k_sum.to(torch.float32).contiguous()
    has_cnt = not isinstance(count, int)   # an int: every sequence has that many keys
    count = count.contiguous() if has_cnt else count
    nseq, max_len, cu = common.seqs(q, cu_seqlens, max_len)
    lowp, ieee = dtype_flags(q.dtype)
    out = new_output((B, S, H, Dv), q)
    cfgs = launch.candidates("apply", D, Dv, q.dtype, q.device.type == "cuda")
    n_e = triton.cdiv(Dv, cfgs[0]["BLOCK_DV"])
    n_chunks, chunk = chunking(max_len, nseq * H * n_e, q.device, launch.programs_per_sm)
    if nseq * H > 0 and max_len > 0:
        _launch("apply", _apply_kernel, (nseq * H * n_e, n_chunks),
                [q, kv_sum, k_sum, count if has_cnt else kv_sum, out, cu, q.stride(0), q.stride(1), q.stride(2),
                 out.stride(0), out.stride(1), out.stride(2), S, H, Hkv, D, Dv, n_e, chunk,
                 0 if has_cnt else count, 1.0 if scale is None else float(scale), float(eps)],
                dict(FM=FEATURE_MAP_IDS[feature_map], VARLEN=cu_seqlens is not None, NORMALIZE=bool(normalize),
                     HAS_SCALE=scale is not None, HAS_CNT=has_cnt, LOWP=lowp, IEEE=ieee, DEN_DOT=launch.den_dot,
                     **even_flags(D, Dv, cfgs[0])),
                cfgs, key=["D", "DV", "FM", "VARLEN", "NORMALIZE"])
    return out


def linear_attention_triton(q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None, cu_seqlens=None,
                            cu_seqlens_k=None, *, launch: Launch):
    """cu_seqlens packs q (and the output), cu_seqlens_k (default: cu_seqlens) packs k and v."""
    max_len, max_len_k = common.max_lens(q, k, cu_seqlens, cu_seqlens_k)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    kv_sum, k_sum, count = linear_attention_state_triton(k, v, feature_map, cu_k, launch=launch,
                                                         count_tensor=False, max_len=max_len_k)
    return linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens,
                                         max_len=max_len, launch=launch)

