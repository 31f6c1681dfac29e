"""dtk: attention kernels for diffusion transformers.

Ops live in ``torch.ops.dtk`` (schemas in csrc/dtk.cpp); this package exports their typed wrappers.
"""
from . import _C  # noqa: F401  (op schemas and C++ kernels)
from .ops.linear import (linear_attention, linear_attention_apply, linear_attention_state,
                         memory_linear_attention, memory_linear_attention_update)
from .ops.window import tile_permutation, window_attention

__all__ = [
    "window_attention", "tile_permutation",
    "linear_attention", "linear_attention_state", "linear_attention_apply",
    "memory_linear_attention", "memory_linear_attention_update",
]
__version__ = "0.1.0"
