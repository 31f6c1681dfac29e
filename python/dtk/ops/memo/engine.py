"""Engine choice of MEMO's ops: CPU tensors are served by the C++ kernels (csrc/memo/cpu.cpp, the
dispatcher's CPU key), CUDA tensors by the Triton kernels (``triton.py``) when they can serve the
call (``can_run_triton``), with the launch configuration decided here (``launch_config``). The
backward ops are one ATen-op kernel for any device (csrc/memo/cpu.cpp)."""
from __future__ import annotations

from ... import _config
from .._checks import MAX_HEAD_DIM, check_triton_float
from .._engine import verdict_of_check
from .._linear_core import next_pow2
from .checks import check_memory_attention, check_memory_update

KERNELS = {"memory": "_memory_kernel", "memory_update": "_memory_update_kernel", "memory_step": "_memory_step_kernel"}

# (clips per program, num_warps, num_stages) of the step kernel that benchmarks/linear_sweep.py times
# against the default (1, 8, 1) at MEMO's D = 40: several clips per program, with loads prefetched
# a clip ahead (sm_90 ptxas at D <= 64: 181-249 registers, no spills; from D = 80 the 4-warp ones
# spill, and 2 warps lose wgmma).
MEMO_STEP_VARIANTS = [(4, 4, 2), (8, 4, 2), (16, 4, 3), (4, 8, 2), (16, 8, 3)]


def launch_config(kernel: str, D: int, Dv: int, frames: int = 16) -> dict:
    """The launch configuration of `kernel` (a key of KERNELS) for head dims D, Dv and `frames`
    frames (the whole frame axis is one block): its block-size constexprs, num_warps, num_stages
    and, for the step, CLIPS (clips per program)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    # The step holds both kernels' fp32 tiles: 8 warps share them (4 warps: 151 registers at D = 40,
    # 255 at D = 128; 8: 119 and 174, no spills; a narrower BLOCK_DV would re-read q and k).
    cfg = dict(BLOCK_S=next_pow2(frames), BLOCK_D=next_pow2(D), BLOCK_DV=min(next_pow2(Dv), 64),
               num_warps=8 if kernel == "memory_step" else 4, num_stages=1)
    if kernel == "memory_step":
        cfg["CLIPS"] = 1   # clips per program (benchmarks/linear_sweep.py times MEMO_STEP_VARIANTS)
    return cfg


def can_run_triton(op: str, *tensors, raise_error: bool = False, **head_dims) -> bool:
    """Whether the Triton kernels serve `op` on these tensors (no float64, head dims up to
    MAX_HEAD_DIM: `head_dims` maps argument names to head dims); with raise_error, why not."""
    return verdict_of_check(lambda: check_triton_float(f"dtk.{op}", tensors, head_dims, MAX_HEAD_DIM), raise_error)


def _serve(op: str, *tensors, **head_dims):
    if not any(t is not None and t.is_cuda for t in tensors):
        head_dims = {}   # the head-dim limit is the compiled kernels' (the interpreter takes any)
    can_run_triton(op, *tensors, raise_error=True, **head_dims)
    _config.record_engine(op, "triton")
    from . import triton
    return triton


def memory_linear_attention(q, k, v, mem_kv=None, mem_z=None, decay=0.9, cfg=None):
    """The Triton forward (cfg: launch_config's unless given)."""
    check_memory_attention(q, k, v, mem_kv, mem_z, decay)
    tr = _serve("memory_linear_attention", q, mem_kv, q=q.shape[-1], v=v.shape[-1])
    cfg = cfg or launch_config("memory", q.shape[-1], v.shape[-1], q.shape[1])
    return tr.memory_linear_attention_triton(q, k, v, mem_kv, mem_z, decay, cfg=cfg)


def memory_linear_attention_update(k, v, mem_kv=None, mem_z=None, decay=0.9, cfg=None):
    check_memory_update(k, v, mem_kv, mem_z, decay)
    tr = _serve("memory_linear_attention_update", k, mem_kv, k=k.shape[-1], v=v.shape[-1])
    cfg = cfg or launch_config("memory_update", k.shape[-1], v.shape[-1], k.shape[1])
    return tr.memory_linear_attention_update_triton(k, v, mem_kv, mem_z, decay, cfg=cfg)


def memory_linear_attention_step(q, k, v, mem_kv=None, mem_z=None, decay=0.9, cfg=None):
    check_memory_attention(q, k, v, mem_kv, mem_z, decay, op="dtk.memory_linear_attention_step")
    tr = _serve("memory_linear_attention_step", q, mem_kv, q=q.shape[-1], v=v.shape[-1])
    cfg = cfg or launch_config("memory_step", q.shape[-1], v.shape[-1], q.shape[1])
    return tr.memory_linear_attention_step_triton(q, k, v, mem_kv, mem_z, decay, cfg=cfg)


__all__ = ["KERNELS", "MEMO_STEP_VARIANTS", "launch_config", "can_run_triton", "memory_linear_attention",
           "memory_linear_attention_update", "memory_linear_attention_step"]
