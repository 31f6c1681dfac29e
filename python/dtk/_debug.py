"""Output allocation and the Triton interpreter's limits. The switches themselves (NaN-filled
outputs, index checks, autotuning, block sizes, engines) are settings of dtk.config (_config.py)."""
import torch

from . import _config


def new_output(shape, *, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised output, NaN-filled under the nan_fill setting (DTK_DEBUG_NAN_FILL=1)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if _config.get("nan_fill") else out


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
