"""dtk: attention kernels for diffusion transformers.

Ops live in ``torch.ops.dtk`` (schemas in csrc/dtk.cpp); this package exports their typed wrappers.
"""
from . import _C  # noqa: F401  (op schemas and C++ kernels)
from .ops.window import tile_permutation, window_attention

__all__ = ["window_attention", "tile_permutation"]
__version__ = "0.1.0"
