"""dtk: attention kernels for diffusion transformers."""
from . import _C  # noqa: F401  (loads the op schemas and the C++ kernels)
from .ops.linear import linear_attention, linear_attention_state, linear_attention_apply, memory_linear_attention, memory_linear_attention_update  # noqa: E402,F401
