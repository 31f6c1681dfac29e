"""Jit helpers and launcher plumbing shared by the linear-attention family's forward
(``triton_forward.py``) and backward (``triton_backward.py``) Triton kernels: the feature maps,
masked loads and stores, the (sequence, head, chunk) of a streaming program, the launch of a kernel
over its candidate configurations, and the packed sequences' bounds.

Last dims must be contiguous (the launchers make them so); any strides on B, S, H.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

FEATURE_MAP_IDS = {"elu1": 0, "relu": 1, "identity": 2}

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



# Triton autotuners, one per (kernel, candidate list): a cache of compiled autotuner objects (each
# keeps its own choice per key of the problem).
_TUNED = {}


def launch(name: str, kernel, grid, args: list, flags: dict, cfgs: list, key: list, reset_to_zero=None):
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


def seqs(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_len: Optional[int] = None):
    """(number of sequences, max length, cu pointer tensor or a dummy). A packed call's max length
    is read to the host (a device sync) unless the caller already did (max_len)."""
    if cu_seqlens is None:
        return x.shape[0], x.shape[1], x  # dummy pointer, never read
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu.numel() - 1, max_len, cu


def max_lens(q, k, cu_seqlens, cu_seqlens_k):
    """The longest packed sequence of q and of k (None without cu_seqlens): one device sync for a
    shared packing, two for separate ones, however many kernels then use them."""
    if cu_seqlens is None:
        return None, None
    max_len = seqs(q, cu_seqlens)[1]
    return max_len, max_len if cu_seqlens_k is None else seqs(k, cu_seqlens_k)[1]
