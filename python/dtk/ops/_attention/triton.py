"""The Triton attention core shared by the window and sparse engines: the online-softmax step and
its fold / finish, the FlashAttention-2 backward pieces (the dq step inside `fold`, the dk/dv step,
the per-row lse and delta pass), row load / store helpers, program index helpers and the launch
configurations. A family's kernels walk their own plan of key blocks and call these for each block;
docs/architecture.md ("The shared attention core") describes how the pieces fit.

Conventions: scores stay raw until the exponent, where one FMA applies `qk_scale` (the softmax
scale times log2 e, so exponents are base 2); row statistics (m_i, lse2) are in log2 units; row
and column offsets that can pass 2^31 are int64."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def step(q, do, acc, m_i, l_i, k, v, qk_mask, MASKED: tl.constexpr, qk_scale, BWD: tl.constexpr):
    """A key block k (BN, BD) / v (BN, BD) folded into a query block's state (fold), its scores
    set to -inf where qk_mask is False (MASKED)."""
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(qk_mask, s, float("-inf"))
    return fold(s, do, acc, m_i, l_i, k, v, qk_scale, 0.0, False, BWD)


@triton.jit
def fold(s, do, acc, m_i, l_i, k, v, qk_scale, floor, FLOORED: tl.constexpr, BWD: tl.constexpr):
    """Raw scores s of a key block folded into a query block's state: the forward's online
    softmax (online_update), or (BWD) the dq step, where m_i holds the rows' lse (log2 units;
    +inf for rows without keys, so P = 0) and l_i their delta = rowsum(dO * out) - dlse, and
    acc += dS K with dS = P * (dO V^T - delta). FLOORED: see online_update."""
    if BWD:
        p = tl.math.exp2(s * qk_scale - m_i[:, None])   # one FMA per score
        ds = p * (tl.dot(do, tl.trans(v)) - l_i[:, None])
        acc += tl.dot(ds.to(k.dtype), k)
    else:
        acc, m_i, l_i = online_update(s, qk_scale, acc, m_i, l_i, v, floor, FLOORED)
    return acc, m_i, l_i


@triton.jit
def online_update(s, qk_scale, acc, m_i, l_i, v, floor, FLOORED: tl.constexpr):
    """Folds a block of raw scores s (BM, BN; -inf where masked) and its values v into (acc, m_i,
    l_i), m_i in log2 units. qk_scale (> 0: the scale times log2 e) is applied inside the exponent,
    one FMA per score (max(s) * qk_scale is the scaled max because qk_scale > 0). FLOORED: masked
    scores are a huge finite negative instead of -inf (the mask-by-dot blocks), and the running
    max never drops below `floor` (far above them, far below any real score), so they get P = 0
    even in a row that has seen no allowed key yet."""
    if FLOORED:
        m_new = tl.maximum(tl.maximum(m_i, tl.max(s, 1) * qk_scale), floor)
        m_safe = m_new
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing allowed yet
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def finish(acc, m_i, l_i):
    """(out, lse) of an online-softmax state: acc / l and the natural-log lse; a row that saw no
    allowed key gets 0 and -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


@triton.jit
def dense_range(q, do, acc, m_i, l_i, k_ptr, v_ptr, sk, sv, lo, hi, qk_scale, offs_n, offs_d, d_mask,
                 BLOCK_N: tl.constexpr, BWD: tl.constexpr):
    """Attend to every key in [lo, hi) of one (batch, kv head) row pointer pair: whole blocks
    without any mask, then the last partial block masked."""
    full_end = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
    for start in range(lo, full_end, BLOCK_N):
        rows = (start + offs_n).to(tl.int64)
        k = key_rows(k_ptr, rows, sk, offs_d, d_mask, False)
        v = key_rows(v_ptr, rows, sv, offs_d, d_mask, False)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, None, False, qk_scale, BWD)
    for start in range(full_end, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        rows = tl.minimum(n, hi - 1).to(tl.int64)   # rows past the range: the last row, masked scores
        k = key_rows(k_ptr, rows, sk, offs_d, d_mask, False)
        v = key_rows(v_ptr, rows, sv, offs_d, d_mask, False)
        acc, m_i, l_i = step(q, do, acc, m_i, l_i, k, v, n_ok[None, :], True, qk_scale, BWD)
    return acc, m_i, l_i


@triton.jit
def key_rows(ptr, rows, stride, offs_d, d_mask, EVEN_D: tl.constexpr):
    """A key block's K or V rows `rows` (int64, every one a real row: the caller clamps rows past
    its range and masks their scores instead), head-dim columns past D read as zeros."""
    return load_rows(ptr, rows, stride, offs_d, None, d_mask, False, EVEN_D)


@triton.jit
def load_rows(ptr, rows, stride, offs_d, n_ok, d_mask, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows `rows` (int64) of a (rows, D) view: pointer math on the row vector first, so the 2D
    tile only adds column offsets; masks only where rows or head-dim columns may be missing."""
    p = (ptr + rows * stride)[:, None] + offs_d[None, :]
    if MASK_N:
        if EVEN_D:
            x = tl.load(p, mask=n_ok[:, None], other=0.0)
        else:
            x = tl.load(p, mask=n_ok[:, None] & d_mask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(p)
        else:
            x = tl.load(p, mask=d_mask[None, :], other=0.0)
    return x


@triton.jit
def row_state(q, do_ptr, do_rows, sdos, lse2_ptr, delta_ptr, stat_rows, ok, offs_d, d_mask,
               BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, BWD: tl.constexpr):
    """A query block's initial walk state (do, m_i, l_i): the forward's empty online softmax (do is
    q, unused), or the backward's output-gradient rows with their lse (log2 units; +inf outside
    the block, so P = 0 there) and delta."""
    if BWD:
        do = load_rows(do_ptr, do_rows, sdos, offs_d, ok, d_mask, True, EVEN_D)
        m_i = tl.load(lse2_ptr + stat_rows, mask=ok, other=float("inf"))
        l_i = tl.load(delta_ptr + stat_rows, mask=ok, other=0.0)
    else:
        do = q
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return do, m_i, l_i


@triton.jit
def write_rows(o_ptrs, lse_ptrs, acc, m_i, l_i, ok, d_mask, dq_scale, BWD: tl.constexpr):
    """Ends a query block's walk: dq = acc * scale (BWD), or out = acc / l and the lse (finish)."""
    if BWD:
        tl.store(o_ptrs, (acc * dq_scale).to(o_ptrs.dtype.element_ty), mask=ok[:, None] & d_mask[None, :])
    else:
        out, lse = finish(acc, m_i, l_i)
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=ok[:, None] & d_mask[None, :])
        tl.store(lse_ptrs, lse, mask=ok)


@triton.jit
def head_indices(bh, H, GROUP):
    """(batch, q head, kv head) as int64 of a program's flat batch x head index (GQA: GROUP q heads
    per kv head)."""
    h = bh % H
    return (bh // H).to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)


@triton.jit
def tile_offsets(D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's row, key and head-dim offsets, and which head-dim columns exist (d < D)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), offs_d, offs_d < D


@triton.jit
def kv_head_indices(bkv, H, GROUP):
    """(batch, kv head) as int64 of a flat batch x kv-head program index."""
    Hkv = H // GROUP
    return (bkv // Hkv).to(tl.int64), (bkv % Hkv).to(tl.int64)


@triton.jit
def dkdv_step(dk, dv, k, v, q_ptr, q_rows, sqs, do_ptr, do_rows, sdos, lse2_ptr, delta_ptr, stat_rows, q_ok,
               offs_d, d_mask, mask, MASKED: tl.constexpr, qk_scale, bias, EVEN_D: tl.constexpr):
    """Folds query rows (valid where q_ok) of one q head into a key block's dk, dv, scores in log2
    units plus a scalar `bias`. q_rows index q, do_rows the output gradient, stat_rows the rows'
    lse (log2 units, +inf for rows without keys: P = 0) and delta (equal for the window engine;
    the sparse engines gather queries). Scores are transposed (keys x queries)."""
    q_rows = q_rows.to(tl.int64)
    if EVEN_D:
        qT = tl.load(q_ptr + q_rows[None, :] * sqs + offs_d[:, None], mask=q_ok[None, :], other=0.0)
    else:
        qT = tl.load(q_ptr + q_rows[None, :] * sqs + offs_d[:, None], mask=q_ok[None, :] & d_mask[:, None], other=0.0)
    do = load_rows(do_ptr, do_rows.to(tl.int64), sdos, offs_d, q_ok, d_mask, True, EVEN_D)
    lse2 = tl.load(lse2_ptr + stat_rows, mask=q_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stat_rows, mask=q_ok, other=0.0)
    sT = tl.dot(k, qT)
    if MASKED:
        sT = tl.where(mask, sT, float("-inf"))
    pT = tl.math.exp2(sT * qk_scale + (bias - lse2)[None, :])   # one FMA per score
    dv += tl.dot(pT.to(do.dtype), do)
    dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


@triton.jit
def _bwd_preprocess(O, DO, LSE, DLSE, LSE2, DELTA, sob, sos, soh, sdob, sdos, sdoh, H, S, D,
                    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: delta = rowsum(dO * out) - dlse, and the lse in log2 units with -inf (a row that
    saw no key) turned into +inf, so the recomputed P of such rows is 0."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = rows < S
    m2 = ok[:, None] & (offs_d < D)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + b * sob + h * soh + rows64[:, None] * sos + offs_d[None, :], mask=m2, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows64[:, None] * sdos + offs_d[None, :], mask=m2, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * S + rows64, mask=ok, other=0.0)
    lse = tl.load(LSE + bh * S + rows64, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + bh * S + rows64, delta, mask=ok)
    tl.store(LSE2 + bh * S + rows64, lse2, mask=ok)


def launch_configs(block_d: int, block_n: int = 64):
    """The (num_warps, num_stages) candidates for a padded head dim and key block, the default
    first. The default fits the 163 KiB of shared memory of sm_80, all fit the 227 KiB of sm_90
    (checked by tests/ops/window/test_triton_compile.py; the autotuner skips what a card cannot
    launch). Shared memory is about 2 bytes x block_d x (128 query rows + 2 x stages x block_n)."""
    if block_d * block_n > 128 * 128:
        return [(8, 1)]
    if block_d * block_n > 128 * 64:
        return [(8, 2), (8, 1)] if block_d <= 128 else [(8, 1), (8, 2)]
    return [(8, 2), (8, 3), (4, 2), (4, 3)]


def backward_launch_configs(block_d: int):
    """(num_warps, num_stages) of the dq and the dk/dv launches at 64 x 64 blocks, chosen from
    ptxas -v on sm_90a (tests/ops/window/test_triton_compile.py): no wgmma serialisation, no
    spills up to d = 64; at d = 128 the dk/dv pass (two 64 x 128 fp32 accumulators) spills a few
    hundred bytes in every config, least with 8 warps. Unmeasured on a GPU."""
    return ((4, 2), (8, 1)) if block_d <= 64 else ((8, 2), (8, 2))


def backward_block(device: torch.device) -> int:
    """Query and key block of the backward (equal: the dk/dv pass walks the plan transposed)."""
    return 64 if device.type == "cuda" else 16


def backward_row_stats(out, grad_out, lse, grad_lse):
    """(lse2, delta), (B, H, n) float32 each, of an attention output (B, n, H, D) with its lse
    (B, H, n) and gradients: the lse in log2 units (+inf for rows without keys) and
    delta = rowsum(grad_out * out) - grad_lse, the per-row inputs of every backward walk."""
    B, n, H, D = out.shape
    lse2 = torch.empty((B, H, n), device=out.device, dtype=torch.float32)
    delta = torch.empty_like(lse2)
    if lse2.numel() == 0:
        return lse2, delta
    dlse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    _bwd_preprocess[(triton.cdiv(n, 64), B * H)](
        out, grad_out, lse.contiguous(), lse if dlse is None else dlse, lse2, delta,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        H, n, D, HAS_DLSE=dlse is not None, BLOCK_M=64, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return lse2, delta


def default_blocks(device: torch.device):
    """(query block, key block) of a kernel that walks plain key ranges (no window plan): 128 x 64
    on a GPU, 16 x 16 in the interpreter (small tests)."""
    return (128, 64) if device.type == "cuda" else (16, 16)
