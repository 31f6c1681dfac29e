"""Python-side registrations of the reuse ops: argument checks for the wrappers, fake (meta) kernel
and CUDA kernel (engine.py: Triton) of scatter_blend. Its CPU kernel is C++ (csrc/reuse/cpu.cpp);
the other reuse ops are device-generic C++ compositions (CompositeExplicitAutograd) that need
nothing here."""
from __future__ import annotations

import importlib.util
import math

import torch

from .._checks import readable
from . import engine

_LIB = "dtk::"


def check_scatter_blend(base, cache, fresh, index, lam, lam_per_batch):
    for name, t in (("base", base), ("cache", cache), ("fresh", fresh), ("index", index)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if base.dim() < 2:
        raise ValueError(f"base must be (B, N, ...), got shape {tuple(base.shape)}")
    if not base.is_floating_point():
        raise TypeError(f"base must be a floating tensor, got {base.dtype}")
    if cache.shape != base.shape:
        raise ValueError(f"cache must have base's shape {tuple(base.shape)}, got {tuple(cache.shape)}")
    if cache.dtype != base.dtype or fresh.dtype != base.dtype:
        raise TypeError(f"cache and fresh must have base's dtype {base.dtype}, got {cache.dtype} and {fresh.dtype}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous (it is updated in place)")
    B, N = base.shape[:2]
    if fresh.dim() != base.dim() or fresh.shape[0] != B or fresh.shape[2:] != base.shape[2:]:
        raise ValueError(f"fresh must be (B={B}, n, {', '.join(map(str, base.shape[2:]))}), got {tuple(fresh.shape)}")
    n = fresh.shape[1]
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be an int32 or int64 tensor, got {index.dtype}")
    if tuple(index.shape) not in ((n,), (B, n)):
        raise ValueError(f"index must be (n={n},) or (B={B}, n={n}) to match fresh, got {tuple(index.shape)}")
    for name, t in (("cache", cache), ("fresh", fresh), ("index", index)):
        if t.device != base.device:
            raise ValueError(f"{name} is on {t.device}, expected base's device {base.device}")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    if lam_per_batch is not None:
        if not lam_per_batch.is_floating_point():
            raise TypeError(f"lam must be a float or a floating tensor, got {lam_per_batch.dtype}")
        if lam_per_batch.numel() != B:
            raise ValueError(f"a lam tensor must hold one value per batch (B={B}), got shape "
                             f"{tuple(lam_per_batch.shape)}")
    if index.numel() and readable(index):
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= N:
            raise IndexError(f"index out of range: entries must be in [0, {N}) or -1, got values in [{lo}, {hi}]")
        if index.device.type != "cpu":   # (the C++ CPU kernel finds duplicates in its own pass)
            s = index.reshape(-1, index.shape[-1]).sort(-1).values
            dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
            if bool(dup.any()):
                raise ValueError(f"dtk.scatter_blend: index has duplicate entry {int(s[:, 1:][dup][0])}")


@torch.library.register_fake(_LIB + "scatter_blend")
def _sb_fake(base, cache, fresh, index, lam, lam_per_batch):
    check_scatter_blend(base, cache, fresh, index, lam, lam_per_batch)
    return torch.empty_like(base)


def _sb_cuda(base, cache, fresh, index, lam, lam_per_batch):
    check_scatter_blend(base, cache, fresh, index, lam, lam_per_batch)
    return engine.scatter_blend_cuda(base, cache, fresh, index, lam, lam_per_batch)


if importlib.util.find_spec("triton") is not None:
    torch.library.register_kernel(_LIB + "scatter_blend", "cuda", _sb_cuda)
