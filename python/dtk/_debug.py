"""Debug switches read from the environment."""
import os

import torch


def nan_fill() -> bool:
    """DTK_DEBUG_NAN_FILL=1: kernels allocate outputs filled with NaN (tests use it to catch unwritten rows)."""
    return os.environ.get("DTK_DEBUG_NAN_FILL", "0") == "1"


def check_indices() -> bool:
    """DTK_CHECK_INDICES=1: index arguments on a GPU are validated too (range, and duplicates for
    scatter_blend) at the cost of a host sync per call; by default only CPU indices are read (a
    GPU kernel skips an out-of-range entry like the -1 padding)."""
    return os.environ.get("DTK_CHECK_INDICES", "0") == "1"


def new_output(shape, *, like: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if nan_fill() else out


def triton_autotune() -> bool:
    """DTK_TRITON_AUTOTUNE=0: GPU kernels use their default launch configuration (and the window
    engine its rule's block sizes) instead of benchmarking the candidates on first use (tests set
    it to keep compile time down)."""
    return os.environ.get("DTK_TRITON_AUTOTUNE", "1") != "0"


def triton_interpreter_broken() -> str:
    """Why Triton's CPU interpreter cannot run dtk's kernels here, or "" when it can. Triton < 3.7
    converts loop bounds with int() on a 1-element array, which NumPy >= 2 rejects, so every loop
    with a tensor bound fails (compiled kernels on a GPU are unaffected)."""
    import numpy
    import triton

    major_minor = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if major_minor < (3, 7) and int(numpy.__version__.split(".")[0]) >= 2:
        return f"Triton {triton.__version__}'s interpreter cannot run loops with tensor bounds under NumPy {numpy.__version__}"
    return ""


def window_blocks_override():
    """DTK_WINDOW_BLOCKS="bq,bk": the window engine's query/key block sizes on a GPU (powers of two
    >= 16), for block-size sweeps; None when unset."""
    v = os.environ.get("DTK_WINDOW_BLOCKS")
    if not v:
        return None
    bq, bk = (int(x) for x in v.split(","))
    if not all(b >= 16 and b & (b - 1) == 0 for b in (bq, bk)):
        raise ValueError(f"DTK_WINDOW_BLOCKS must be two powers of two >= 16 like '128,64', got {v!r}")
    return bq, bk


def sparse_engine() -> str:
    """DTK_SPARSE_ENGINE=triton|cudnn|auto (default auto): which GPU engine serves
    multi_kv_attention and segment_attention; auto takes cuDNN for the calls it supports
    (ops/sparse/cudnn.py) and Triton for the rest. For side-by-side benchmarks and debugging."""
    v = os.environ.get("DTK_SPARSE_ENGINE", "auto")
    if v not in ("auto", "triton", "cudnn"):
        raise ValueError(f"DTK_SPARSE_ENGINE must be auto, triton or cudnn, got {v!r}")
    return v
