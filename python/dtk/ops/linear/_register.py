"""Registration of the linear-attention ops beyond their C++ schemas and CPU kernels:
fake (meta) kernels for torch.compile, autograd for ``linear_attention``, and the Triton
kernels for the CUDA dispatch key (imported lazily, so importing dtk never imports Triton and
``TRITON_INTERPRET`` may be set later)."""
from __future__ import annotations

import torch

_LIB = "dtk::"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_seqs(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ------------------------------------------------------------------------------------ fake kernels

@torch.library.register_fake(_LIB + "linear_attention")
def _la_fake(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.register_fake(_LIB + "linear_attention_backward")
def _la_bwd_fake(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake(_LIB + "linear_attention_state")
def _state_fake(k, v, feature_map, cu_seqlens):
    n, H, D, Dv = _num_seqs(k, cu_seqlens), k.shape[2], k.shape[3], v.shape[3]
    acc = _acc(k.dtype)
    return (k.new_empty((n, H, D, Dv), dtype=acc), k.new_empty((n, H, D), dtype=acc),
            k.new_empty((n,), dtype=torch.int64))


@torch.library.register_fake(_LIB + "linear_attention_apply")
def _apply_fake(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens):
    return q.new_empty(q.shape[:3] + kv_sum.shape[3:])


@torch.library.register_fake(_LIB + "memory_linear_attention")
def _mem_fake(q, k, v, mem_kv, mem_z, decay):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.register_fake(_LIB + "memory_linear_attention_update")
def _mem_upd_fake(k, v, mem_kv, mem_z, decay):
    B, _, H, D = k.shape
    acc = _acc(k.dtype)
    return k.new_empty((B, H, D, v.shape[3]), dtype=acc), k.new_empty((B, H, D), dtype=acc)


@torch.library.register_fake(_LIB + "memory_linear_attention_step")
def _mem_step_fake(q, k, v, mem_kv, mem_z, decay):
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


# MEMO: gradients of q, k, v and of the memory (so training can backpropagate across clips); the
# backward ops are one ATen-op kernel for any device (csrc/linear/cpu.cpp).

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

# Head dims the GPU kernels take: their tiles span the padded head dim (a power of two), and
# 256 is the largest whose tiles the compile tests fit in registers and shared memory.
GPU_MAX_HEAD_DIM = 256


def _triton(op: str, *tensors, **head_dims):
    """The Triton module, after rejecting float64 (its kernels accumulate in float32, so float64
    inputs would silently lose precision and get float32 states, unlike the fakes' float64) and
    head dims (`head_dims`: argument name -> head dim) above GPU_MAX_HEAD_DIM."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"dtk.{op}: float64 is CPU-only (the GPU kernels accumulate in float32); use float16, "
                            "bfloat16 or float32 on CUDA")
    for name, d in head_dims.items():
        if d > GPU_MAX_HEAD_DIM:
            raise ValueError(f"dtk.{op}: the GPU kernels take head dims up to {GPU_MAX_HEAD_DIM}, got {name} head dim "
                             f"{d} (CPU tensors take any)")
    from . import triton as tr
    return tr


def _check_packings(op: str, cu_seqlens, cu_seqlens_k):
    """The raw op's packings, as far as no host sync is needed: the kernels index cu_seqlens_k by
    cu_seqlens' sequences, so without cu_seqlens, or with a cu_seqlens_k of another length, they
    would read past it or pair the wrong sequences."""
    if cu_seqlens_k is None:
        return
    if cu_seqlens is None:
        raise ValueError(f"dtk.{op}: cu_seqlens_k (the packing of k and v) needs cu_seqlens (the packing of q)")
    if cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.dim() != 1:
        raise TypeError(f"dtk.{op}: cu_seqlens_k must be a 1-D int32 tensor, got {cu_seqlens_k.dtype} "
                        f"of shape {tuple(cu_seqlens_k.shape)}")
    if cu_seqlens_k.shape[0] != cu_seqlens.shape[0]:
        raise ValueError(f"dtk.{op}: cu_seqlens_k must describe as many sequences as cu_seqlens "
                         f"({cu_seqlens.shape[0] - 1}), got {cu_seqlens_k.shape[0] - 1}")


def _register_cuda():
    import importlib.util
    if importlib.util.find_spec("triton") is None:  # no Triton: the dispatcher says "no CUDA kernel"
        return  # (find_spec, not import: Triton must first be imported after TRITON_INTERPRET is set)

    @torch.library.register_kernel(_LIB + "linear_attention", "cuda")
    def _la_cuda(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
        tr = _triton("linear_attention", q, q=q.shape[-1], v=v.shape[-1])
        _check_packings("linear_attention", cu_seqlens, cu_seqlens_k)
        return tr.linear_attention_triton(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k)

    @torch.library.register_kernel(_LIB + "linear_attention_backward", "cuda")
    def _la_bwd_cuda(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k=None):
        tr = _triton("linear_attention_backward", q, q=q.shape[-1], v=v.shape[-1])
        _check_packings("linear_attention_backward", cu_seqlens, cu_seqlens_k)
        return tr.linear_attention_backward_triton(grad_out, q, k, v, feature_map, normalize, eps, scale, cu_seqlens,
                                                   cu_seqlens_k)

    @torch.library.register_kernel(_LIB + "linear_attention_state", "cuda")
    def _state_cuda(k, v, feature_map, cu_seqlens):
        tr = _triton("linear_attention_state", k, k=k.shape[-1], v=v.shape[-1])
        return tr.linear_attention_state_triton(k, v, feature_map, cu_seqlens)

    @torch.library.register_kernel(_LIB + "linear_attention_apply", "cuda")
    def _apply_cuda(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens):
        tr = _triton("linear_attention_apply", q, kv_sum, q=q.shape[-1], kv_sum=kv_sum.shape[-1])
        return tr.linear_attention_apply_triton(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale,
                                                cu_seqlens)

    @torch.library.register_kernel(_LIB + "memory_linear_attention", "cuda")
    def _mem_cuda(q, k, v, mem_kv, mem_z, decay):
        tr = _triton("memory_linear_attention", q, mem_kv, q=q.shape[-1], v=v.shape[-1])
        return tr.memory_linear_attention_triton(q, k, v, mem_kv, mem_z, decay)

    @torch.library.register_kernel(_LIB + "memory_linear_attention_update", "cuda")
    def _mem_upd_cuda(k, v, mem_kv, mem_z, decay):
        tr = _triton("memory_linear_attention_update", k, mem_kv, k=k.shape[-1], v=v.shape[-1])
        return tr.memory_linear_attention_update_triton(k, v, mem_kv, mem_z, decay)

    @torch.library.register_kernel(_LIB + "memory_linear_attention_step", "cuda")
    def _mem_step_cuda(q, k, v, mem_kv, mem_z, decay):
        tr = _triton("memory_linear_attention_step", q, mem_kv, q=q.shape[-1], v=v.shape[-1])
        return tr.memory_linear_attention_step_triton(q, k, v, mem_kv, mem_z, decay)


_register_cuda()
