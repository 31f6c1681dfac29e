"""Python-side registrations of the sparse-token ops: the fake (meta) kernels, autograd, and the
CUDA kernels, which check their arguments (checks.py, as the wrappers and the fake kernels do) and
hand the call to the engine that serves it (engine.py). The CPU kernels are C++
(csrc/sparse/cpu.cpp), registered there; the CUDA kernels only where Triton is installed."""
from __future__ import annotations

import importlib.util

import torch

from ... import _config
from .checks import check_multi_kv, check_multi_kv_backward, check_segment, check_segment_backward

_LIB = "dtk::"


# ------------------------------------------------------------------------------------ fake kernels

@torch.library.register_fake(_LIB + "multi_kv_attention")
def _mkv_fake(q, ks, vs, kv_index, q_index, scale):
    check_multi_kv(q, ks, vs, kv_index, q_index, scale)
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    return q.new_empty(B, n, H, D), q.new_empty(B, H, n, dtype=torch.float32)


@torch.library.register_fake(_LIB + "multi_kv_attention_out")
def _mkv_out_fake(q, ks, vs, kv_index, q_index, scale, out):
    check_multi_kv(q, ks, vs, kv_index, q_index, scale, out)
    B, S, H, D = q.shape
    return q.new_empty(B, H, q_index.shape[1], dtype=torch.float32)


@torch.library.register_fake(_LIB + "segment_attention")
def _seg_fake(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.register_fake(_LIB + "multi_kv_attention_backward")
def _mkv_bwd_fake(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
    check_multi_kv_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse)
    return q.new_empty(q.shape), [k.new_empty(k.shape) for k in ks], [v.new_empty(v.shape) for v in vs]


@torch.library.register_fake(_LIB + "segment_attention_backward")
def _seg_bwd_fake(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
    check_segment_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ------------------------------------------------------------------------------------ autograd
# FlashAttention-2 backward from the saved (out, lse); grad_lse (from return_lse) is folded in.
# The in-place scatter op (multi_kv_attention_out) has no autograd: with grad, the wrapper scatters
# the differentiable op's rows into `out` instead.

def _lastdim(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mkv_setup(ctx, inputs, output):
    q, ks, vs, kv_index, q_index, scale = inputs
    out, lse = output
    ctx.n = len(ks)
    kv_index = list(kv_index) if kv_index else [None] * len(ks)
    ctx.save_for_backward(q, out, lse, q_index, *ks, *vs, *kv_index)
    ctx.scale = scale


def _mkv_backward(ctx, grad_out, grad_lse):
    q, out, lse, q_index, *rest = ctx.saved_tensors
    n = ctx.n
    ks, vs, kv_index = rest[:n], rest[n:2 * n], rest[2 * n:]
    if q.device.type == "cpu":
        _config.record_engine("multi_kv_attention_backward", "cpp")
    dq, dks, dvs = torch.ops.dtk.multi_kv_attention_backward(_lastdim(grad_out), grad_lse, q, ks, vs, kv_index,
                                                             q_index, ctx.scale, out, lse)
    return dq, list(dks), list(dvs), None, None, None


def _seg_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, group_mask, group_bias, scale = inputs
    if group_bias is not None and group_bias.requires_grad:   # no silent zero gradient
        raise ValueError("dtk.segment_attention: group_bias is a constant (it gets no gradient); "
                         "pass group_bias.detach() or a tensor that does not require grad")
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_seqlens, group_mask, group_bias, out, lse)
    ctx.scale = scale


def _seg_backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens, group_mask, group_bias, out, lse = ctx.saved_tensors
    if q.device.type == "cpu":
        _config.record_engine("segment_attention_backward", "cpp")
    dq, dk, dv = torch.ops.dtk.segment_attention_backward(_lastdim(grad_out), grad_lse, q, k, v, cu_seqlens,
                                                          group_mask, group_bias, ctx.scale, out, lse)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(_LIB + "multi_kv_attention", _mkv_backward, setup_context=_mkv_setup)
torch.library.register_autograd(_LIB + "segment_attention", _seg_backward, setup_context=_seg_setup)


# ------------------------------------------------------------------------------------ CUDA

def _register_cuda():
    if importlib.util.find_spec("triton") is None:
        return
    from . import engine

    @torch.library.register_kernel(_LIB + "multi_kv_attention", "cuda")
    def _mkv_cuda(q, ks, vs, kv_index, q_index, scale):
        scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale)
        return engine.multi_kv_attention(q, ks, vs, kv_index, q_index, scale)

    @torch.library.register_kernel(_LIB + "multi_kv_attention_out", "cuda")
    def _mkv_out_cuda(q, ks, vs, kv_index, q_index, scale, out):
        scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale, out)
        return engine.multi_kv_attention(q, ks, vs, kv_index, q_index, scale, out)[1]

    @torch.library.register_kernel(_LIB + "segment_attention", "cuda")
    def _seg_cuda(q, k, v, cu_seqlens, group_mask, group_bias, scale):
        scale = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
        return engine.segment_attention(q, k, v, cu_seqlens, group_mask, group_bias, scale)

    @torch.library.register_kernel(_LIB + "multi_kv_attention_backward", "cuda")
    def _mkv_bwd_cuda(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
        scale = check_multi_kv_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse)
        return engine.multi_kv_attention_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse)

    @torch.library.register_kernel(_LIB + "segment_attention_backward", "cuda")
    def _seg_bwd_cuda(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
        scale = check_segment_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out,
                                       lse)
        return engine.segment_attention_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias,
                                                 scale, out, lse)


_register_cuda()
