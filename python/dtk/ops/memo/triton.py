"""Triton kernels of MEMO's memory linear attention (GPU; CPU tensors under ``TRITON_INTERPRET=1``)
and their launchers.

``_memory_kernel`` / ``_memory_update_kernel``, one program per (batch, head), the whole (short)
frame axis in registers: efficient for a huge batch of ~16-frame sequences.
``_memory_step_kernel`` computes both for one clip (the wrapper's default update), reading k, v
and the fp32 memory once instead of twice.

Each launcher takes its launch configuration (``cfg``: block sizes, num_warps, num_stages and, for
the step, CLIPS) from ``engine.py``; it decides nothing. Last dims must be contiguous (the launchers
make them so); any strides on B, S, H.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._linear_core import flag_args, lastdim, new_output
from .._linear_core.triton import mm as _mm


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
    # two 4-warp programs filled an SM (far below the copy bandwidth, benchmarks/RESULTS.md).
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



def _memo_args(mem_kv, mem_z, placeholder):
    """(HAS_MEM, fp32 contiguous mem_kv, mem_z) for the MEMO kernels; without memory `placeholder`
    stands for the pointers, never read."""
    if mem_kv is None:
        return False, placeholder, placeholder
    return True, mem_kv.to(torch.float32).contiguous(), mem_z.to(torch.float32).contiguous()


def _decay_args(decay: float, S: int):
    """(log2 decay, decay^S) of the update kernels: w_j = exp2((S-1-j) log2 decay), 0 for decay = 0."""
    return math.log2(decay) if decay > 0 else -1e30, float(decay) ** S


def memory_linear_attention_triton(q, k, v, mem_kv=None, mem_z=None, decay=0.9, *, cfg: dict):
    q, k, v = lastdim(q), lastdim(k), lastdim(v)
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    out = new_output((B, S, H, Dv), q)
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, q)
    if B * H > 0 and S > 0:
        _memory_kernel[(B * H, triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            q, k, v, mkv, mz, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S, H, D, Dv, float(decay), D ** -0.5, HAS_MEM=has_mem, **flag_args(q.dtype),
            **cfg)
    return out


def memory_linear_attention_step_triton(q, k, v, mem_kv=None, mem_z=None, decay=0.9, *, cfg: dict):
    """(out, new kv, new z) of one clip: memory_linear_attention_triton and
    memory_linear_attention_update_triton with the same k, v in one launch."""
    q, k, v = lastdim(q), lastdim(k), lastdim(v)
    B, S, H, D = q.shape
    Dv = v.shape[-1]
    out = new_output((B, S, H, Dv), q)
    nkv = new_output((B, H, D, Dv), like=k, dtype=torch.float32)
    nz = new_output((B, H, D), like=k, dtype=torch.float32)
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, nkv)
    if B * H > 0:
        if S == 0:  # no frames: the memory unchanged (decay^0), out is empty
            return (out, mkv.clone(), mz.clone()) if has_mem else (out, nkv.zero_(), nz.zero_())
        _memory_step_kernel[(triton.cdiv(B * H, cfg["CLIPS"]), triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            q, k, v, mkv, mz, out, nkv, nz, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S, H, D, Dv, B * H, float(decay), D ** -0.5, *_decay_args(decay, S), HAS_MEM=has_mem,
            **flag_args(q.dtype), **cfg)
    return out, nkv, nz


def memory_linear_attention_update_triton(k, v, mem_kv=None, mem_z=None, decay=0.9, *, cfg: dict):
    k, v = lastdim(k), lastdim(v)
    B, S, H, D = k.shape
    Dv = v.shape[-1]
    nkv = new_output((B, H, D, Dv), like=k, dtype=torch.float32)
    nz = new_output((B, H, D), like=k, dtype=torch.float32)
    has_mem, mkv, mz = _memo_args(mem_kv, mem_z, nkv)
    if B * H > 0:
        if S == 0:
            return (mkv.clone(), mz.clone()) if has_mem else (nkv.zero_(), nz.zero_())
        _memory_update_kernel[(B * H, triton.cdiv(Dv, cfg["BLOCK_DV"]))](
            k, v, mkv, mz, nkv, nz, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            S, H, D, Dv, *_decay_args(decay, S), HAS_MEM=has_mem, **flag_args(k.dtype),
            **cfg)
    return nkv, nz
