"""Engine choice of the linear-attention ops, and the one place that decides the launch parameters
of a CUDA call. CPU tensors are served by the C++ kernels (csrc/linear/cpu.cpp, the dispatcher's
CPU key); CUDA tensors by the Triton kernels (``triton_forward.py``, ``triton_backward.py``) when
they can serve the call (``can_run_triton``), launched with the settings of ``dtk.config``
(``launch_params``: linear_state_ks_by_dot, linear_apply_den_by_dot, linear_programs_per_sm,
linear_state_atomic, autotune) and, for the backward, whole D x Dv tiles or the wide kernels
(``launch.backward_whole_tiles``). The kernel modules read no setting."""
from __future__ import annotations

from typing import Optional

from ... import _config
from .._checks import MAX_HEAD_DIM, check_triton_float
from .._engine import verdict_of_check
from . import launch as _launch_mod
from .checks import check_apply, check_linear_attention, check_linear_attention_backward, check_state
from .launch import Launch, backward_whole_tiles

# Head dims the GPU kernels take: their tiles span the padded head dim (a power of two), and 256 is
# the largest whose tiles the compile tests fit in registers and shared memory.
GPU_MAX_HEAD_DIM = MAX_HEAD_DIM


def launch_params() -> Launch:
    """The launch parameters of a call made now (dtk.config's settings)."""
    return Launch(ks_dot=_config.get("linear_state_ks_by_dot"), den_dot=_config.get("linear_apply_den_by_dot"),
                  programs_per_sm=_config.get("linear_programs_per_sm"), atomic=_config.get("linear_state_atomic"),
                  autotune=_config.get("autotune"), configs=_launch_mod.launch_configs)


def can_run_triton(op: str, *tensors, raise_error: bool = False, **head_dims) -> bool:
    """Whether the Triton kernels serve `op` on these tensors: no float64 (they accumulate in
    float32) and head dims (`head_dims`: argument name -> head dim) up to GPU_MAX_HEAD_DIM; with
    raise_error, the reason they cannot (an error naming the op and the argument)."""
    return verdict_of_check(lambda: check_triton_float(f"dtk.{op}", tensors, head_dims, GPU_MAX_HEAD_DIM), raise_error)


def _serve(op: str, *tensors, **head_dims) -> Launch:
    if not any(t is not None and t.is_cuda for t in tensors):
        head_dims = {}   # the head-dim limit is the compiled kernels' (the interpreter takes any)
    can_run_triton(op, *tensors, raise_error=True, **head_dims)
    _config.record_engine(op, "triton")
    return launch_params()


def linear_attention(q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None, cu_seqlens=None,
                     cu_seqlens_k=None):
    """The Triton forward of dtk.linear_attention."""
    check_linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, values=False)
    launch = _serve("linear_attention", q, q=q.shape[-1], v=v.shape[-1])
    from .triton_forward import linear_attention_triton
    return linear_attention_triton(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k,
                                   launch=launch)


def linear_attention_backward(grad_out, q, k, v, feature_map="elu1", normalize=True, eps=1e-4, scale=None,
                              cu_seqlens=None, cu_seqlens_k=None, wide: Optional[bool] = None):
    """(dq, dk, dv) by the Triton backward; `wide` forces the wide kernels (True) or the whole-tile
    ones (False) where both serve, else the head dims decide (backward_whole_tiles)."""
    check_linear_attention_backward(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k)
    launch = _serve("linear_attention_backward", q, q=q.shape[-1], v=v.shape[-1])
    whole = backward_whole_tiles(q.shape[-1], v.shape[-1])
    wide = (not whole) if wide is None else (wide or not whole)
    from .triton_backward import linear_attention_backward_triton
    return linear_attention_backward_triton(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens,
                                            cu_seqlens_k, launch=launch, wide=wide)


def linear_attention_state(k, v, feature_map="elu1", cu_seqlens=None):
    check_state(k, v, feature_map, cu_seqlens, values=False)
    launch = _serve("linear_attention_state", k, k=k.shape[-1], v=v.shape[-1])
    from .triton_forward import linear_attention_state_triton
    return linear_attention_state_triton(k, v, feature_map, cu_seqlens, launch=launch)


def linear_attention_apply(q, kv_sum, k_sum, count, feature_map="elu1", normalize=True, eps=1e-4, scale=None,
                           cu_seqlens=None):
    check_apply(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens, values=False)
    launch = _serve("linear_attention_apply", q, kv_sum, q=q.shape[-1], kv_sum=kv_sum.shape[-1])
    from .triton_forward import linear_attention_apply_triton
    return linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens,
                                         launch=launch)
