"""dtk: attention kernels for diffusion transformers.

Ops live in ``torch.ops.dtk`` (schemas in csrc/dtk.cpp); this package exports their typed wrappers.
"""
from . import _C  # noqa: F401  (op schemas and C++ kernels)
from .ops.linear import (linear_attention, linear_attention_apply, linear_attention_state,
                         memory_linear_attention, memory_linear_attention_update)
from .ops.window import tile_permutation, window_attention
from .ops.sparse import multi_kv_attention, ominicontrol_group_mask, segment_attention
from .ops.cache import dilate_mask, mask_to_index, prune_isolated, scatter_blend, token_change_score
from . import cache  # noqa: F401,E402  (cache objects: dtk.cache.KVCache, OutputCache, RefreshPolicy)

__all__ = [
    "window_attention", "tile_permutation",
    "linear_attention", "linear_attention_state", "linear_attention_apply",
    "memory_linear_attention", "memory_linear_attention_update",
    "multi_kv_attention", "segment_attention", "ominicontrol_group_mask",
    "scatter_blend", "token_change_score", "mask_to_index", "dilate_mask", "prune_isolated", "cache",
]
__version__ = "0.1.0"
