"""dtk: attention kernels for diffusion transformers.

Ops live in ``torch.ops.dtk`` (schemas in csrc/dtk.cpp); this package exports their typed wrappers.
``dtk.info()`` (or ``python -m dtk``) reports the version and which engines this install has.
"""
try:
    from . import _C  # noqa: F401  (op schemas and C++ kernels)
except ImportError as _e:  # most often: built against another torch (the C++ ABI changes between releases)
    import torch as _torch
    raise ImportError(f"dtk: cannot load its compiled extension dtk._C ({_e}). Build it against the installed "
                      f"torch ({_torch.__version__}): `pip install --no-build-isolation .` from the source tree, or "
                      f"`python setup.py build_ext --inplace` for a checkout used via PYTHONPATH=python.") from _e
from ._config import config, config_options, last_engine
from ._info import info
from .ops.layout import from_tile_order, suggest_tile, tile_permutation, to_tile_order
from .ops.linear import linear_attention, linear_attention_apply, linear_attention_state
from .ops.memo import memory_linear_attention, memory_linear_attention_update
from .ops.window import window_attention
from .ops.sparse import multi_kv_attention, ominicontrol_group_mask, segment_attention
from .ops.rotary import rms_norm_rope
from .ops.reuse import dilate_mask, mask_to_index, prune_isolated, scatter_blend, token_change_score
from . import cache  # noqa: F401,E402  (cache objects: dtk.cache.KVCache, OutputCache, RefreshPolicy)

__all__ = [
    "window_attention", "tile_permutation", "suggest_tile", "to_tile_order", "from_tile_order",
    "linear_attention", "linear_attention_state", "linear_attention_apply",
    "memory_linear_attention", "memory_linear_attention_update",
    "multi_kv_attention", "segment_attention", "ominicontrol_group_mask",
    "rms_norm_rope",
    "scatter_blend", "token_change_score", "mask_to_index", "dilate_mask", "prune_isolated", "cache",
    "info", "config", "config_options", "last_engine",
]
__version__ = "0.1.0"
