"""dtk: attention kernels for diffusion transformers."""
from . import _C  # noqa: F401  (loads the op schemas and the C++ kernels)
