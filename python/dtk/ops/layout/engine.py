"""Which engine serves dtk::tile_reorder: C++ on the CPU; on CUDA the CUDA C++ kernel
(csrc/layout/cuda.cu), or, in a build without the CUDA sources (a CPU-only wheel on a GPU
machine), the torch kernel (reference.py's gather, registered by _register.py)."""
from __future__ import annotations

import torch

from ... import _C, _config


def can_run_cuda(raise_error: bool = False) -> bool:
    """Whether the CUDA C++ kernel was compiled into this build."""
    if getattr(_C, "with_cuda", 0):
        return True
    if raise_error:
        raise RuntimeError("dtk.tile_reorder: the CUDA C++ kernel was not compiled into this build "
                           f"({getattr(_C, 'cuda_note', '') or 'built without CUDA'})")
    return False


def engine_for(device: torch.device) -> str:
    """The engine that serves a call on `device`: "cpp" (CPU), "cuda" (CUDA C++) or "torch"."""
    if device.type == "cuda":
        return "cuda" if can_run_cuda() else "torch"
    return "cpp" if device.type == "cpu" else "torch"


def record(x) -> None:
    """Notes the engine serving a tile_reorder call on x (dtk.last_engine("tile_reorder"))."""
    if isinstance(x, torch.Tensor) and not torch.compiler.is_compiling():
        _config.record_engine("tile_reorder", engine_for(x.device))
