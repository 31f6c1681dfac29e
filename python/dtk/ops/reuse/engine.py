"""Which engine serves a reuse op. scatter_blend: C++ on the CPU (csrc/reuse/cpu.cpp), Triton on
CUDA (triton.py, two launches; the block sizes are chosen here). token_change_score,
mask_to_index, dilate_mask and prune_isolated are device-generic C++ compositions of ATen ops
(CompositeExplicitAutograd): "cpp" on every device."""
from __future__ import annotations

import math

import torch

from ... import _config
from .._engine import triton_reason, verdict

BLEND_BLOCK = 1024          # elements per program of the blend pass
SCATTER_BLOCK_MAX = 1024    # elements per step of a fresh row's copy


def can_run_triton(base: torch.Tensor, raise_error: bool = False) -> bool:
    """Whether the Triton kernel can serve scatter_blend on base's device."""
    return verdict("scatter_blend", triton_reason(base), raise_error)


def scatter_blend_cuda(base, cache, fresh, index, lam, lam_per_batch):
    """scatter_blend on CUDA: the Triton kernel with this module's block sizes."""
    can_run_triton(base, raise_error=True)
    from .triton import scatter_blend_triton   # Triton compiles lazily, only where CUDA runs
    C = max(math.prod(base.shape[2:]), 1)          # elements per row
    scatter_block = min(SCATTER_BLOCK_MAX, 1 << (C - 1).bit_length())
    _config.record_engine("scatter_blend", "triton")
    return scatter_blend_triton(base, cache, fresh, index, lam, lam_per_batch,
                                blend_block=BLEND_BLOCK, scatter_block=scatter_block)


def record(op: str, t) -> None:
    """Notes the engine of a wrapper's call: "cpp" for the C++ kernels (CPU tensors; the
    compositions on any device). scatter_blend on CUDA is recorded by scatter_blend_cuda."""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor):
        return
    if op != "scatter_blend" or t.device.type == "cpu":
        _config.record_engine(op, "cpp")
