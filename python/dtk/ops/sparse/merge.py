"""Exact merge of partial attention results over disjoint key sets through their log-sum-exp:
out = sum_i w_i o_i / sum_i w_i with w_i = exp(lse_i - max_i lse_i), lse = log sum_i exp(lse_i),
one Triton pass that also writes the rows where they belong (compact, or scattered into `out`'s
q_index rows). Used by the cuDNN engine (one partial per K/V segment) and by the Triton engine
past MAX_SEGMENTS segments (one partial per group of segments)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output

MAX_PARTS = 4   # partials one pass takes


@triton.jit
def _merge(O0, O1, O2, O3, L0, L1, L2, L3, QI, OUT, LSE,
           sob, soh, son, slb, slh, sqib, sutb, suts, suth, slob, sloh,
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
    tl.store(LSE + b * slob + h * sloh + rows, lse, mask=r_ok)


def merge_partials(parts, lses, res, lse, *, q_index=None, S=0, scatter=False):
    """Merges `parts` (each (B, H, n, D) logical, any strides) with their `lses` (each (B, H, n)
    float32) into `res` and `lse` (B, H, n; any strides but a unit last one, e.g. a slice). `res`
    is (B, n, H, D) (rows of q_index padding get 0 and lse -inf), or with `scatter` the
    (B, S, H, D) `out` whose q_index rows are written (padding and out-of-range entries skipped). More than MAX_PARTS partials merge in stages
    through float32 intermediates."""
    while len(parts) > MAX_PARTS:
        B, H, n, D = parts[0].shape
        o = new_output((B, H, n, D), like=parts[0], dtype=torch.float32)
        l = new_output((B, H, n), like=parts[0], dtype=torch.float32)
        _launch(parts[:MAX_PARTS], lses[:MAX_PARTS], o.transpose(1, 2), l, None, 0, False)
        parts, lses = [o] + list(parts[MAX_PARTS:]), [l] + list(lses[MAX_PARTS:])
    _launch(parts, lses, res, lse, q_index, S, scatter)


def _launch(parts, lses, res, lse, q_index, S, scatter):
    B, H, n, D = parts[0].shape
    if n == 0:
        return
    lses = [x.contiguous() for x in lses]
    o0 = parts[0]
    if any(o.stride() != o0.stride() for o in parts):
        parts = [o.contiguous() for o in parts]
        o0 = parts[0]
    qi = lses[0] if q_index is None else (q_index if q_index.stride(-1) == 1 else q_index.contiguous())
    pad = lambda xs: list(xs) + [xs[0]] * (MAX_PARTS - len(xs))  # noqa: E731  (unused pointer slots)
    BLOCK_R = 32 if o0.is_cuda else 16
    _merge[(triton.cdiv(n, BLOCK_R), B * H)](
        *pad(parts), *pad(lses), qi, res, lse,
        o0.stride(0), o0.stride(1), o0.stride(2), lses[0].stride(0), lses[0].stride(1),
        qi.stride(0), res.stride(0), res.stride(1), res.stride(2), lse.stride(0), lse.stride(1),
        H, n, S, D,
        NSEG=len(parts), HAS_QI=q_index is not None, SCATTER=scatter,
        BLOCK_R=BLOCK_R, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=4)
