"""Registration of the linear-attention ops beyond their C++ schemas and CPU kernels:
fake (meta) kernels for torch.compile (checking their arguments like the wrappers), autograd for
``linear_attention``, and the Triton kernels for the CUDA dispatch key (through ``engine.py``;
Triton is imported lazily, so importing dtk never imports it and ``TRITON_INTERPRET`` may be set
later)."""
from __future__ import annotations

import importlib.util

import torch

from . import engine
from .checks import check_apply, check_linear_attention, check_linear_attention_backward, check_state

_LIB = "dtk::"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_seqs(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ------------------------------------------------------------------------------------ fake kernels

@torch.library.register_fake(_LIB + "linear_attention")
def _la_fake(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
    check_linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k, values=False)
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.register_fake(_LIB + "linear_attention_backward")
def _la_bwd_fake(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
    check_linear_attention_backward(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake(_LIB + "linear_attention_state")
def _state_fake(k, v, feature_map, cu_seqlens):
    check_state(k, v, feature_map, cu_seqlens, values=False)
    n, H, D, Dv = _num_seqs(k, cu_seqlens), k.shape[2], k.shape[3], v.shape[3]
    acc = _acc(k.dtype)
    return (k.new_empty((n, H, D, Dv), dtype=acc), k.new_empty((n, H, D), dtype=acc),
            k.new_empty((n,), dtype=torch.int64))


@torch.library.register_fake(_LIB + "linear_attention_apply")
def _apply_fake(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens):
    check_apply(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens, values=False)
    return q.new_empty(q.shape[:3] + kv_sum.shape[3:])


# ------------------------------------------------------------------------------------ autograd

def _la_setup_context(ctx, inputs, output):
    q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, cu_seqlens_k)
    ctx.args = (feature_map, normalize, eps, scale)


def _la_backward(ctx, grad_out):
    q, k, v, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    feature_map, normalize, eps, scale = ctx.args
    dq, dk, dv = torch.ops.dtk.linear_attention_backward(grad_out, q, k, v, feature_map, normalize, eps, scale,
                                                         cu_seqlens, cu_seqlens_k)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(_LIB + "linear_attention", _la_backward, setup_context=_la_setup_context)


# ------------------------------------------------------------------------------------ CUDA (Triton)

def _register_cuda():
    if importlib.util.find_spec("triton") is None:  # no Triton: the dispatcher says "no CUDA kernel"
        return  # (find_spec, not import: Triton must first be imported after TRITON_INTERPRET is set)

    @torch.library.register_kernel(_LIB + "linear_attention", "cuda")
    def _la_cuda(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
        return engine.linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k)

    @torch.library.register_kernel(_LIB + "linear_attention_backward", "cuda")
    def _la_bwd_cuda(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
        return engine.linear_attention_backward(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens,
                                                cu_seqlens_k)

    @torch.library.register_kernel(_LIB + "linear_attention_state", "cuda")
    def _state_cuda(k, v, feature_map, cu_seqlens):
        return engine.linear_attention_state(k, v, feature_map, cu_seqlens)

    @torch.library.register_kernel(_LIB + "linear_attention_apply", "cuda")
    def _apply_cuda(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens):
        return engine.linear_attention_apply(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens)


_register_cuda()
