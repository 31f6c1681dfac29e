"""Debug switches read from the environment."""
import os

import torch


def nan_fill() -> bool:
    """DTK_DEBUG_NAN_FILL=1: kernels allocate outputs filled with NaN (tests use it to catch unwritten rows)."""
    return os.environ.get("DTK_DEBUG_NAN_FILL", "0") == "1"


def new_output(shape, *, like: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if nan_fill() else out


def triton_autotune() -> bool:
    """DTK_TRITON_AUTOTUNE=0: GPU kernels use their default launch configuration instead of
    benchmarking the candidates on first use (tests set it to keep compile time down)."""
    return os.environ.get("DTK_TRITON_AUTOTUNE", "1") != "0"
