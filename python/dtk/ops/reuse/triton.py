"""Triton kernels of the reuse family (GPU): scatter_blend in two back-to-back launches that touch
each element once: the blend pass reads base and cache and writes out over all rows; the scatter
pass then writes the fresh rows into cache and out (the fresh rows' blend is fresh itself:
(1-lam)*fresh + lam*fresh). No host sync, no inverse map, no temporary."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output


@triton.jit
def _blend(BASE, CACHE, OUT, LAM, lam, per_batch, HAS_LAM: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < per_batch
    p = b * per_batch + offs
    if HAS_LAM:
        lam = tl.load(LAM + b).to(tl.float32)
    x = tl.load(BASE + p, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(CACHE + p, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + p, ((1.0 - lam) * x + lam * c).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _scatter(FRESH, IDX, CACHE, OUT, sib, N, n, C, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    r = tl.load(IDX + b * sib + j).to(tl.int64)
    if (r >= 0) & (r < N):
        for c0 in range(0, C, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < C
            f = tl.load(FRESH + (b * n + j) * C + offs, mask=ok)
            tl.store(CACHE + (b * N + r) * C + offs, f, mask=ok)
            tl.store(OUT + (b * N + r) * C + offs, f, mask=ok)


def scatter_blend_triton(base, cache, fresh, index, lam, lam_per_batch, blend_block: int = 1024,
                         scatter_block: int = 1024):
    """Launches both passes: `blend_block` elements per blend program, `scatter_block` (a power of
    two) elements per step of a fresh row's copy (engine.py chooses both)."""
    B, N = base.shape[:2]
    n = fresh.shape[1]
    base_c = base.contiguous()
    fresh_c = fresh.contiguous()
    idx = index if index.stride(-1) == 1 else index.contiguous()
    sib = 0 if idx.dim() == 1 else idx.stride(0)
    out = new_output(base.shape, like=base)
    per_batch = base[0].numel() if B else 0
    C = per_batch // N if N else 0
    lam_t = (lam_per_batch.to(device=base.device, dtype=torch.float32).reshape(B).contiguous()
             if lam_per_batch is not None else base_c)
    if B and per_batch:
        _blend[(triton.cdiv(per_batch, blend_block), B)](base_c, cache, out, lam_t, float(lam), per_batch,
                                                         HAS_LAM=lam_per_batch is not None, BLOCK=blend_block)
    if B and n and C:
        _scatter[(n, B)](fresh_c, idx, cache, out, sib, N, n, C, BLOCK=scatter_block)
    return out
