"""Which engine serves dtk::rms_norm_rope: C++ on the CPU (csrc/rotary/cpu.cpp), Triton on CUDA
(triton.py), launched with the configuration chosen here: one token per program for the
across-heads norm, else the rows per program that `_tuning.choice("rotary.launch", ...)` keeps
per (D, flags, dtypes, device): timed on a problem's first call on a GPU with autotuning on, the
middle configuration otherwise (autotune off, or a first call during CUDA-graph capture)."""
from __future__ import annotations

import torch

from ... import _config, _tuning
from .._engine import triton_reason, verdict


def can_run_triton(x: torch.Tensor, raise_error: bool = False) -> bool:
    """Whether the Triton kernel can serve a call on x (the arguments checked already: x's dtype is
    one of _register.GPU_DTYPES on CUDA)."""
    return verdict("rms_norm_rope", triton_reason(x), raise_error)


def launch_config(x, weight, cos, sin, eps, interleaved, across_heads):
    """The Triton launch configuration for this call (see the module docstring)."""
    from . import triton as kernels
    B, S, H, D = x.shape
    if across_heads:
        return kernels.across_heads_config(H, D)
    cfgs = kernels.launch_configs(D, x.device.type == "cuda")
    default = cfgs[len(cfgs) // 2]
    if len(cfgs) == 1 or B * S * H == 0:
        return default
    problem = (D, weight is not None, cos is not None, bool(interleaved), x.dtype,
               weight.dtype if weight is not None else None, str(x.device))

    def measure():
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)

        def run(cfg):
            return lambda: kernels.rms_norm_rope_triton(x, weight, cos, sin, eps, interleaved, False, cfg, out)
        for cfg in cfgs:            # compile every candidate before timing
            run(cfg)()
        return min(cfgs, key=lambda cfg: _tuning.median_ms(run(cfg), reps=5))
    return _tuning.choice("rotary.launch", problem, x.device, measure, lambda: default)


def rms_norm_rope_cuda(x, weight, cos, sin, eps, interleaved, across_heads=False):
    """rms_norm_rope on CUDA: the Triton kernel with its chosen launch."""
    can_run_triton(x, raise_error=True)
    from .triton import rms_norm_rope_triton   # Triton compiles lazily, only where CUDA runs
    cfg = launch_config(x, weight, cos, sin, eps, interleaved, across_heads)
    _config.record_engine("rms_norm_rope", "triton")
    return rms_norm_rope_triton(x, weight, cos, sin, eps, interleaved, across_heads, cfg)


def record_cpu(x) -> None:
    """A wrapper's CPU call: the C++ kernel serves it."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not torch.compiler.is_compiling():
        _config.record_engine("rms_norm_rope", "cpp")
