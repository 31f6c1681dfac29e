"""Triton kernel of rms_norm_rope (GPU): each program normalises and rotates ROWS (b, s, h) rows of
D elements (with across_heads, one token's H rows under one norm). The rotation's partner elements
are a second load of the same row (it hits the cache: DRAM traffic stays one read of x and one
write), so any even D works without splitting pairs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output


@triton.jit
def _weight(W, h, d, ok, d_ok, D, ACROSS_HEADS: tl.constexpr):
    """The norm weights of columns d, as a (rows, columns) or (1, columns) float32 tile."""
    if ACROSS_HEADS:   # (H * D,): each row its head's slice
        return tl.load(W + (h * D)[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        return tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _rms_norm_rope_fwd(X, W, COS, SIN, OUT, n_rows, S, H, sb, ss, sh, D, eps,
                       HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
                       ACROSS_HEADS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    if ACROSS_HEADS:   # one token per program: its H rows (ROWS >= H) share one norm
        rows = tl.program_id(0).to(tl.int64) * H + tl.arange(0, ROWS)
        row_ok = tl.arange(0, ROWS) < H
    else:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
    h = rows % H
    t = (rows // H) % S
    b = rows // (S * H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    ok = row_ok[:, None] & d_ok[None, :]
    x_row = X + (b * sb + t * ss + h * sh)[:, None]
    x = tl.load(x_row + d[None, :], mask=ok, other=0.0).to(tl.float32)
    if ACROSS_HEADS:
        r = tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * D) + eps)
    else:
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    y = x * r
    if HAS_WEIGHT:
        y = y * _weight(W, h, d, ok, d_ok, D, ACROSS_HEADS)
    if ROPE:
        if INTERLEAVED:
            p = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        else:
            half = D // 2
            p = tl.where(d < half, d + half, d - half)
            sign = tl.where(d < half, -1.0, 1.0)
        p = tl.where(d_ok, p, 0)
        rot = tl.load(x_row + p[None, :], mask=ok, other=0.0).to(tl.float32) * r
        if HAS_WEIGHT:
            rot = rot * _weight(W, h, p, ok, d_ok, D, ACROSS_HEADS)
        table = t[:, None] * D + d[None, :]
        c = tl.load(COS + table, mask=ok, other=0.0)
        s = tl.load(SIN + table, mask=ok, other=0.0)
        y = y * c + sign[None, :] * rot * s
    tl.store(OUT + rows[:, None] * D + d[None, :], y.to(OUT.dtype.element_ty), mask=ok)


def launch_configs(D: int, gpu: bool = True) -> list:
    """Every launch the engine may choose for head dim D: rows per program (~4, 8 or 16 KB of bf16
    x each), the padded head dim and warps; one (the middle one) off the GPU (the interpreter)."""
    BLOCK_D = triton.next_power_of_2(D)
    base = max(1, 4096 // BLOCK_D)
    rows = sorted({max(1, base // 2), base, min(128, 2 * base)}) if gpu else [base]
    return [dict(ROWS=r, BLOCK_D=BLOCK_D, num_warps=8 if r * BLOCK_D > 4096 else 4) for r in rows]


def across_heads_config(H: int, D: int) -> dict:
    """The launch of the across-heads norm (Wan): one token's H rows per program."""
    ROWS, BLOCK_D = triton.next_power_of_2(H), triton.next_power_of_2(D)
    return dict(ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=4 if ROWS * BLOCK_D <= 4096 else 8)


def rms_norm_rope_triton(x, weight, cos, sin, eps, interleaved, across_heads=False, config=None, out=None):
    """One launch of the kernel with launch configuration `config` (a dict of ROWS, BLOCK_D and
    num_warps: one of launch_configs(D), or across_heads_config(H, D) with across_heads; None: the
    middle of launch_configs, or the across-heads one). Writes into `out` when given."""
    B, S, H, D = x.shape
    out = new_output((B, S, H, D), like=x) if out is None else out
    n_rows = B * S * H
    if n_rows == 0 or D == 0:
        return out
    if config is None:
        cfgs = launch_configs(D, x.device.type == "cuda")
        config = across_heads_config(H, D) if across_heads else cfgs[len(cfgs) // 2]
    f32 = dict(device=x.device, dtype=torch.float32)
    w = weight.contiguous() if weight is not None else out     # read in its own dtype
    c = cos.to(**f32).contiguous() if cos is not None else out
    s = sin.to(**f32).contiguous() if sin is not None else out
    args = (x, w, c, s, out, n_rows, S, H, x.stride(0), x.stride(1), x.stride(2), D, float(eps))
    flags = dict(HAS_WEIGHT=weight is not None, ROPE=cos is not None, INTERLEAVED=bool(interleaved),
                 ACROSS_HEADS=bool(across_heads))
    grid = (B * S,) if across_heads else (triton.cdiv(n_rows, config["ROWS"]),)   # across heads: one token each
    _rms_norm_rope_fwd[grid](*args, **flags, **config)
    return out
