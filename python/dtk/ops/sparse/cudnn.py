"""cuDNN engine of multi_kv_attention for dense segments (no kv_index): each K/V segment is one
call of torch's cuDNN attention (the fastest dense kernel on Hopper, DESIGN §5) returning its
log-sum-exp, and one Triton pass merges the partial outputs exactly through their lse, writing
the result in place: compact rows, or scattered into `out`'s q_index rows. Sparse queries are
gathered once (a small copy: the edited rows only). The K/V segments are never concatenated.

The same code runs on the CPU with torch's CPU flash attention as the dense kernel (and the merge
kernel in Triton's interpreter), which is how the gather / merge / scatter logic is tested without
a GPU; on a GPU the Triton engine (triton.py) serves every case this one does not."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output

MAX_SEGMENTS = 4   # partial outputs one merge pass takes


def supported(q, ks, kv_index) -> bool:
    """Whether this engine serves the call: a CUDA fp16/bf16 q, one K/V head per q head, a head
    dim cuDNN takes, at most MAX_SEGMENTS segments, none of them indexed."""
    H, D = q.shape[2], q.shape[3]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128
            and 0 < len(ks) <= MAX_SEGMENTS and all(k.shape[2] == H for k in ks)
            and all(i is None for i in kv_index))


def _dense_with_lse(q, k, v, scale):
    """Dense attention of (B, H, n, D) views: (out (B, H, n, D), lse (B, H, n) float32, natural log)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


@triton.jit
def _merge(O0, O1, O2, O3, L0, L1, L2, L3, QI, OUT, LSE,
           sob, soh, son, slb, slh, sqib, sutb, suts, suth,
           H, N, S, D,
           NSEG: tl.constexpr, HAS_QI: tl.constexpr, SCATTER: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_i w_i o_i / sum_i w_i with w_i = exp(lse_i - max lse) per row, lse = log sum exp.
    Partial outputs share their (B, H, n, D) strides. With q_index: padding / out-of-range rows
    get 0 and -inf (compact output) or are skipped (SCATTER into out's q_index rows)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    m2 = r_ok[:, None] & (offs_d < D)[None, :]
    lb = b * slb + h * slh + rows
    ob = b * sob + h * soh + rows.to(tl.int64)[:, None] * son + offs_d[None, :]
    l0 = tl.load(L0 + lb, mask=r_ok, other=float("-inf"))
    m = l0
    if NSEG > 1:
        l1 = tl.load(L1 + lb, mask=r_ok, other=float("-inf"))
        m = tl.maximum(m, l1)
    if NSEG > 2:
        l2 = tl.load(L2 + lb, mask=r_ok, other=float("-inf"))
        m = tl.maximum(m, l2)
    if NSEG > 3:
        l3 = tl.load(L3 + lb, mask=r_ok, other=float("-inf"))
        m = tl.maximum(m, l3)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(l0 - m)
    den = w
    acc = w[:, None] * tl.load(O0 + ob, mask=m2, other=0.0).to(tl.float32)
    if NSEG > 1:
        w = tl.exp(l1 - m)
        den += w
        acc += w[:, None] * tl.load(O1 + ob, mask=m2, other=0.0).to(tl.float32)
    if NSEG > 2:
        w = tl.exp(l2 - m)
        den += w
        acc += w[:, None] * tl.load(O2 + ob, mask=m2, other=0.0).to(tl.float32)
    if NSEG > 3:
        w = tl.exp(l3 - m)
        den += w
        acc += w[:, None] * tl.load(O3 + ob, mask=m2, other=0.0).to(tl.float32)
    den_safe = tl.where(den == 0.0, 1.0, den)
    res = acc / den_safe[:, None]
    lse = tl.where(den == 0.0, float("-inf"), m + tl.log(den_safe))
    dest = rows.to(tl.int64)
    ok = r_ok
    if HAS_QI:
        tgt = tl.load(QI + b * sqib + rows, mask=r_ok, other=-1).to(tl.int64)
        valid = (tgt >= 0) & (tgt < S)
        if SCATTER:
            dest = tgt
            ok = r_ok & valid
        else:
            res = tl.where(valid[:, None], res, 0.0)
            lse = tl.where(valid, lse, float("-inf"))
    tl.store(OUT + b * sutb + dest[:, None] * suts + h * suth + offs_d[None, :], res.to(OUT.dtype.element_ty),
             mask=ok[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + (b * H + h) * N + rows, lse, mask=r_ok)


def multi_kv_attention_cudnn(q, ks, vs, q_index, scale, out=None):
    """(out, lse) as multi_kv_attention_triton, for calls `supported` accepts (and CPU tensors in
    tests). Empty segments are skipped; with every segment empty rows get 0 and lse -inf."""
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    lse = new_output((B, H, n), like=q, dtype=torch.float32)
    res = out if out is not None else new_output((B, n, H, D), like=q)
    if q_index is not None:
        qi = q_index if q_index.stride(-1) == 1 else q_index.contiguous()
        rows = torch.where((qi >= 0) & (qi < S), qi, 0).long()   # padding gathers row 0, discarded below
        qg = torch.gather(q, 1, rows[:, :, None, None].expand(B, n, H, D))
    else:
        qi, qg = q, q
    if n == 0:
        return res, lse
    parts = [_dense_with_lse(qg.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
             for k, v in zip(ks, vs) if k.shape[1] > 0]
    if not parts:   # no key at all: a zero block of cuDNN work is not a call to make
        parts = [(qg.new_zeros(B, H, n, D), qg.new_full((B, H, n), float("-inf"), dtype=torch.float32))]
    os_, ls = zip(*parts)
    ls = [x.contiguous() for x in ls]
    o0 = os_[0]
    if any(o.stride() != o0.stride() for o in os_):
        os_ = [o.contiguous() for o in os_]
        o0 = os_[0]
    pad = lambda xs: list(xs) + [xs[0]] * (MAX_SEGMENTS - len(xs))  # noqa: E731  (unused pointer slots)
    BLOCK_R = 32 if q.is_cuda else 16
    grid = (triton.cdiv(n, BLOCK_R), B * H)
    _merge[grid](*pad(os_), *pad(ls), qi, res, lse,
                 o0.stride(0), o0.stride(1), o0.stride(2), ls[0].stride(0), ls[0].stride(1),
                 qi.stride(0), res.stride(0), res.stride(1), res.stride(2),
                 H, n, S, D,
                 NSEG=len(os_), HAS_QI=q_index is not None, SCATTER=out is not None,
                 BLOCK_R=BLOCK_R, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4)
    return res, lse
