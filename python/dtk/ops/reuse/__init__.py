"""Reuse ops: the cache and token-selection ops of feature reuse (SpotEdit's SpotFusion /
SpotSelector, FreeSwim's reuse). The cache objects that hold reused features across steps are
`dtk.cache` (KVCache, OutputCache, RefreshPolicy).

Op schemas (csrc/dtk.cpp):
  scatter_blend(Tensor base, Tensor(a!) cache, Tensor fresh, Tensor index, float lam,
                Tensor? lam_per_batch) -> Tensor
  token_change_score(Tensor[] features, Tensor[] reference, int pool, int[]? size) -> Tensor
  mask_to_index(Tensor mask, int? max_count, int num_prefix) -> (Tensor, Tensor)
  dilate_mask(Tensor mask, int iterations) -> Tensor
  prune_isolated(Tensor mask, int min_neighbors) -> Tensor

Engines (engine.py): scatter_blend is C++ on the CPU (csrc/reuse/cpu.cpp) and Triton on CUDA
(triton.py); the other ops are C++ compositions of ATen ops on every device. The references
are reference.py.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _register  # noqa: F401  (fake kernel and Triton CUDA kernel of scatter_blend)
from . import engine
from ._register import check_scatter_blend

__all__ = ["scatter_blend", "token_change_score", "mask_to_index", "dilate_mask", "prune_isolated"]


def scatter_blend(base: torch.Tensor, cache: torch.Tensor, fresh: torch.Tensor, index: torch.Tensor,
                  lam: Union[float, torch.Tensor]) -> torch.Tensor:
    """SpotFusion, fused: ``cache[:, index] = fresh`` in place, and returns
    ``(1 - lam) * scattered(base) + lam * cache`` (scattered(base): base with the same rows replaced
    by fresh, so those rows come out as fresh).

    Args:
        base: (B, N, ...) floating; cache: same shape and dtype, contiguous (updated in place);
        fresh: (B, n, ...); index: (n,) or (B, n) int rows of dim 1, -1 = padding (skipped).
            Duplicate entries are an error on CPU; on the GPU they are checked only with
            DTK_CHECK_INDICES=1 (a host sync), else which fresh row lands is unspecified.
        lam: float, or a tensor with one value per batch (0-dim tensors are broadcast).
    """
    B = base.shape[0] if isinstance(base, torch.Tensor) and base.dim() else 0
    lam_t = None
    if isinstance(lam, torch.Tensor):
        lam_t = lam.reshape(-1)
        if lam_t.numel() == 1 and B != 1:
            lam_t = lam_t.expand(B)
        lam = 0.0
    check_scatter_blend(base, cache, fresh, index, float(lam), lam_t)
    out = torch.ops.dtk.scatter_blend(base, cache, fresh, index, float(lam), lam_t)
    engine.record("scatter_blend", base)
    return out


def token_change_score(features: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], pool: int = 2,
                       size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """SpotSelector's per-token score: for each pair of (B, C, h, w) maps, channel-wise L2
    normalisation, squared difference summed over channels, bilinear resize to ``size`` (default:
    the first map's (h, w)); mean over the list; average-pool by ``pool``.
    Returns (B, h/pool, w/pool) float32 (float64 for float64 inputs); ``.flatten(1)`` gives one
    score per token in row-major order."""
    out = torch.ops.dtk.token_change_score(list(features), list(reference), int(pool),
                                           None if size is None else list(size))
    engine.record("token_change_score", features[0])
    return out


def mask_to_index(mask: torch.Tensor, *, max_count: Optional[int] = None,
                  num_prefix: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Selected-token mask -> (index (B, n_max) int32, count (B,) int32), on mask's device with no
    host synchronisation (cumsum + scatter only), usable directly as ``q_index``.

    mask: (B, N) bool, or (B, h, w) (flattened row-major). With ``num_prefix`` P, the index starts
    with 0..P-1 (e.g. the text tokens) and the mask's tokens are offset by P. ``n_max`` is
    ``max_count`` if given, else P + N (static shape: no sync); unused slots hold -1. ``count`` is
    the true number of selected tokens (P included), even when it exceeds n_max (then the index
    holds the first n_max of them)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        mask = mask.flatten(1)
    out = torch.ops.dtk.mask_to_index(mask, max_count, int(num_prefix))
    engine.record("mask_to_index", mask)
    return out


def dilate_mask(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """3x3 dilation of a (B, h, w) bool mask, ``iterations`` times."""
    out = torch.ops.dtk.dilate_mask(mask, int(iterations))
    engine.record("dilate_mask", mask)
    return out


def prune_isolated(mask: torch.Tensor, min_neighbors: int = 1) -> torch.Tensor:
    """Clears set tokens of a (B, h, w) bool mask with fewer than ``min_neighbors`` set tokens among
    their 8 neighbours (the default removes isolated tokens)."""
    out = torch.ops.dtk.prune_isolated(mask, int(min_neighbors))
    engine.record("prune_isolated", mask)
    return out
