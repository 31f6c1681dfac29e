"""What the two linear-attention families (``ops/linear``: LinFusion's linear attention, ``ops/memo``:
MEMO's memory linear attention) share: host-side helpers of their Triton launchers here (no Triton
import), the jit dot helper in ``triton.py``. Their argument checks are in ``ops/_checks.py``."""
from __future__ import annotations

from typing import Tuple

import torch


def next_pow2(x: int, lo: int = 16) -> int:
    """The smallest power of two >= x and >= lo (a padded tile size)."""
    return max(lo, 1 << (max(int(x), 1) - 1).bit_length())


def lastdim(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (the kernels' loads assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dtype_flags(dtype: torch.dtype) -> Tuple[bool, bool]:
    """(LOWP: 16-bit dot operands, IEEE: exact fp32 dots for fp32 inputs)."""
    lowp = dtype in (torch.float16, torch.bfloat16)
    return lowp, not lowp


def flag_args(dtype: torch.dtype) -> dict:
    """dtype_flags as the kernels' LOWP / IEEE constexpr arguments."""
    lowp, ieee = dtype_flags(dtype)
    return dict(LOWP=lowp, IEEE=ieee)


def new_output(shape, like, dtype=None):
    """An output tensor (NaN-filled with the nan_fill setting, so that an unwritten row shows)."""
    from ..._debug import new_output as _new
    return _new(shape, like=like, dtype=dtype)
