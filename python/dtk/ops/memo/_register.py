"""Registration of MEMO's ops beyond their C++ schemas and kernels (csrc/memo/cpu.cpp): fake (meta)
kernels for torch.compile, autograd (gradients of q, k, v and of the memory, so training can
backpropagate across clips), and the Triton kernels for the CUDA dispatch key (through
``engine.py``; Triton is imported lazily, so importing dtk never imports it and
``TRITON_INTERPRET`` may be set later)."""
from __future__ import annotations

import importlib.util

import torch

from . import engine
from .checks import check_memory_attention, check_memory_update

_LIB = "dtk::"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ fake kernels

@torch.library.register_fake(_LIB + "memory_linear_attention")
def _mem_fake(q, k, v, mem_kv, mem_z, decay):
    check_memory_attention(q, k, v, mem_kv, mem_z, decay)
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.register_fake(_LIB + "memory_linear_attention_update")
def _mem_upd_fake(k, v, mem_kv, mem_z, decay):
    check_memory_update(k, v, mem_kv, mem_z, decay)
    B, _, H, D = k.shape
    acc = _acc(k.dtype)
    return k.new_empty((B, H, D, v.shape[3]), dtype=acc), k.new_empty((B, H, D), dtype=acc)


@torch.library.register_fake(_LIB + "memory_linear_attention_step")
def _mem_step_fake(q, k, v, mem_kv, mem_z, decay):
    check_memory_attention(q, k, v, mem_kv, mem_z, decay, op="dtk.memory_linear_attention_step")
    return (_mem_fake(q, k, v, mem_kv, mem_z, decay), *_mem_upd_fake(k, v, mem_kv, mem_z, decay))


@torch.library.register_fake(_LIB + "memory_linear_attention_backward")
def _mem_bwd_fake(grad_out, q, k, v, mem_kv, mem_z, decay):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), _like_or_empty(mem_kv, q),
            _like_or_empty(mem_z, q))


def _like_or_empty(t, other):
    """A new tensor shaped like t, or a (0,) one (the gradient slot of an absent memory)."""
    return other.new_empty((0,)) if t is None else t.new_empty(t.shape)


@torch.library.register_fake(_LIB + "memory_linear_attention_update_backward")
def _mem_upd_bwd_fake(grad_kv, grad_z, k, v, mem_kv, mem_z, decay):
    return k.new_empty(k.shape), v.new_empty(v.shape), _like_or_empty(mem_kv, k), _like_or_empty(mem_z, k)


# ------------------------------------------------------------------------------------ autograd
# The backward ops are one ATen-op kernel for any device (csrc/memo/cpu.cpp).

def _mem_setup_context(ctx, inputs, output):
    q, k, v, mem_kv, mem_z, decay = inputs
    ctx.save_for_backward(q, k, v, mem_kv, mem_z)
    ctx.decay = decay


def _mem_backward(ctx, grad_out):
    q, k, v, mem_kv, mem_z = ctx.saved_tensors
    dq, dk, dv, dmkv, dmz = torch.ops.dtk.memory_linear_attention_backward(grad_out, q, k, v, mem_kv, mem_z, ctx.decay)
    has_mem = mem_kv is not None
    return dq, dk, dv, dmkv if has_mem else None, dmz if has_mem else None, None


def _mem_upd_setup_context(ctx, inputs, output):
    k, v, mem_kv, mem_z, decay = inputs
    ctx.save_for_backward(k, v, mem_kv, mem_z)
    ctx.decay = decay


def _mem_upd_backward(ctx, grad_kv, grad_z):
    k, v, mem_kv, mem_z = ctx.saved_tensors
    dk, dv, dmkv, dmz = torch.ops.dtk.memory_linear_attention_update_backward(grad_kv, grad_z, k, v, mem_kv, mem_z,
                                                                             ctx.decay)
    has_mem = mem_kv is not None
    return dk, dv, dmkv if has_mem else None, dmz if has_mem else None, None


def _mem_step_backward(ctx, grad_out, grad_kv, grad_z):
    """The step is the two ops on the same inputs: the sum of their gradients (an unused output's
    gradient may be None)."""
    q, k, v, mem_kv, mem_z = ctx.saved_tensors
    grads = [None] * 5   # q, k, v, mem_kv, mem_z
    if grad_out is not None:
        grads = list(torch.ops.dtk.memory_linear_attention_backward(grad_out, q, k, v, mem_kv, mem_z, ctx.decay))
    if grad_kv is not None or grad_z is not None:
        upd = torch.ops.dtk.memory_linear_attention_update_backward(grad_kv, grad_z, k, v, mem_kv, mem_z, ctx.decay)
        grads[1:] = [u if g is None else g + u for g, u in zip(grads[1:], upd)]
    if mem_kv is None:
        grads[3:] = [None, None]
    return (*grads, None)


torch.library.register_autograd(_LIB + "memory_linear_attention", _mem_backward, setup_context=_mem_setup_context)
torch.library.register_autograd(_LIB + "memory_linear_attention_update", _mem_upd_backward,
                                setup_context=_mem_upd_setup_context)
torch.library.register_autograd(_LIB + "memory_linear_attention_step", _mem_step_backward,
                                setup_context=_mem_setup_context)


# ------------------------------------------------------------------------------------ CUDA (Triton)

def _register_cuda():
    if importlib.util.find_spec("triton") is None:  # no Triton: the dispatcher says "no CUDA kernel"
        return  # (find_spec, not import: Triton must first be imported after TRITON_INTERPRET is set)

    @torch.library.register_kernel(_LIB + "memory_linear_attention", "cuda")
    def _mem_cuda(q, k, v, mem_kv, mem_z, decay):
        return engine.memory_linear_attention(q, k, v, mem_kv, mem_z, decay)

    @torch.library.register_kernel(_LIB + "memory_linear_attention_update", "cuda")
    def _mem_upd_cuda(k, v, mem_kv, mem_z, decay):
        return engine.memory_linear_attention_update(k, v, mem_kv, mem_z, decay)

    @torch.library.register_kernel(_LIB + "memory_linear_attention_step", "cuda")
    def _mem_step_cuda(q, k, v, mem_kv, mem_z, decay):
        return engine.memory_linear_attention_step(q, k, v, mem_kv, mem_z, decay)


_register_cuda()
