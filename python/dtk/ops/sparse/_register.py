"""Python-side registrations of the sparse-token ops: argument checks shared by the wrappers, the
fake (meta) kernels and the Triton (CUDA) kernels. The CPU kernels are C++ (csrc/sparse/cpu.cpp)
with the same checks. Index *values* are checked only for CPU tensors (a check on the GPU would
need a host sync); on the GPU an out-of-range entry is treated like padding (-1)."""
from __future__ import annotations

import importlib.util

import torch

from ... import _config
from .._attention import dense as _dense
from .._checks import readable
from .._checks import check_bshd as _check_bshd, check_gpu as _check_gpu, check_grads, check_kv_like_q, check_scale as _check_scale

_LIB = "dtk::"
_INT = (torch.int32, torch.int64)


def _check_index(idx, name, q, limit, shapes):
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor, got {type(idx).__name__}")
    if idx.dtype not in _INT:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {idx.dtype}")
    if idx.device != q.device:
        raise ValueError(f"{name} is on {idx.device}, expected q's device {q.device}")
    if tuple(idx.shape[:-1]) not in shapes and not (idx.dim() == 1 and () in shapes):
        raise ValueError(f"{name} has shape {tuple(idx.shape)}; expected {' or '.join(_fmt(s) for s in shapes)}")
    if idx.numel() and readable(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= limit:
            raise IndexError(f"{name} out of range: entries must be in [0, {limit}) or -1 (padding), "
                             f"got values in [{lo}, {hi}]")


def _fmt(batch):
    return "(m,)" if batch == () else f"({batch[0]}, m)"


def check_multi_kv(q, ks, vs, kv_index, q_index, scale, out=None):
    """Validates dtk.multi_kv_attention's arguments; returns the scale. Errors name the argument."""
    _check_bshd(q, q, "q")
    B, SQ, H, D = q.shape
    ks, vs = list(ks), list(vs)
    if len(ks) != len(vs):
        raise ValueError(f"ks and vs must have the same number of segments, got {len(ks)} and {len(vs)}")
    if not ks:
        raise ValueError("ks must hold at least one K/V segment")
    Hkv = ks[0].shape[2] if isinstance(ks[0], torch.Tensor) and ks[0].dim() == 4 else None
    for i, (k, v) in enumerate(zip(ks, vs)):
        _check_bshd(k, q, f"ks[{i}]")
        _check_bshd(v, q, f"vs[{i}]")
        if k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D:
            raise ValueError(f"ks[{i}] must be (B={B}, L, H_kv={Hkv}, D={D}), got {tuple(k.shape)} "
                             "(mismatched segments)")
        if v.shape != k.shape:
            raise ValueError(f"vs[{i}] must have the shape of ks[{i}] {tuple(k.shape)}, got {tuple(v.shape)} "
                             "(mismatched segments)")
    if H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if kv_index is not None and len(kv_index) not in (0, len(ks)):
        raise ValueError(f"kv_index must hold one entry (tensor or None) per segment ({len(ks)}), got {len(kv_index)}")
    for i, idx in enumerate(kv_index or []):
        if idx is not None:
            if not isinstance(idx, torch.Tensor):
                raise TypeError(f"kv_index[{i}] must be an integer tensor or None, got {type(idx).__name__}")
            if idx.dim() not in (1, 2):
                raise ValueError(f"kv_index[{i}] must be (m,) or (B={B}, m), got shape {tuple(idx.shape)}")
            _check_index(idx, f"kv_index[{i}]", q, ks[i].shape[1], [(), (B,)])
    if q_index is not None:
        if not isinstance(q_index, torch.Tensor):
            raise TypeError(f"q_index must be an integer tensor (B={B}, n), got {type(q_index).__name__}")
        if q_index.dim() != 2:
            raise ValueError(f"q_index must be (B={B}, n), got shape {tuple(q_index.shape)}")
        _check_index(q_index, "q_index", q, SQ, [(B,)])
    if out is not None:
        if q_index is None:
            raise ValueError("out needs q_index (the rows to scatter into)")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if out.dtype != q.dtype or out.device != q.device:
            raise TypeError(f"out must match q's dtype {q.dtype} and device {q.device}, got {out.dtype} on {out.device}")
    _check_gpu(q)
    return _check_scale(scale, D)


def check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    """Validates dtk.segment_attention's arguments; returns the scale."""
    _check_bshd(q, q, "q")
    _check_bshd(k, q, "k")
    _check_bshd(v, q, "v")
    B, S, H, D = q.shape
    check_kv_like_q(q, k, v)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor with G+1 >= 2 entries")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    G = cu_seqlens.numel() - 1
    if not isinstance(group_mask, torch.Tensor) or group_mask.dtype != torch.bool:
        raise TypeError(f"group_mask must be a bool tensor, got "
                        f"{group_mask.dtype if isinstance(group_mask, torch.Tensor) else type(group_mask).__name__}")
    if tuple(group_mask.shape) != (G, G):
        raise ValueError(f"group_mask must be G x G = {G} x {G} (G = len(cu_seqlens) - 1), got shape "
                         f"{tuple(group_mask.shape)}")
    if group_bias is not None:
        if not group_bias.is_floating_point():
            raise TypeError(f"group_bias must be a floating tensor, got {group_bias.dtype}")
        if tuple(group_bias.shape) != (G, G):
            raise ValueError(f"group_bias must be G x G = {G} x {G}, got shape {tuple(group_bias.shape)}")
    if cu_seqlens.numel() and readable(cu_seqlens):
        c = cu_seqlens.tolist()
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != S:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at S={S}, got {c}")
    _check_gpu(q)
    return _check_scale(scale, D)


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


def check_multi_kv_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
    """check_multi_kv, and out / grad_out (B, n, H, D), lse / grad_lse (B, H, n) float32, with
    n = q_index's width (S_q without q_index); returns the scale."""
    scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale)
    check_grads(grad_out, grad_lse, out, lse, q)
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    if tuple(out.shape) != (B, n, H, D):
        raise ValueError(f"out must be (B, n, H, D) = {(B, n, H, D)} (n = q_index's width, else S_q), "
                         f"got {tuple(out.shape)}")
    return scale


def check_segment_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
    """check_segment, and out / grad_out shaped like q, lse / grad_lse (B, H, S) float32."""
    scale = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
    check_grads(grad_out, grad_lse, out, lse, q)
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    return scale


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
    dq, dk, dv = torch.ops.dtk.segment_attention_backward(_lastdim(grad_out), grad_lse, q, k, v, cu_seqlens,
                                                          group_mask, group_bias, ctx.scale, out, lse)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(_LIB + "multi_kv_attention", _mkv_backward, setup_context=_mkv_setup)
torch.library.register_autograd(_LIB + "segment_attention", _seg_backward, setup_context=_seg_setup)


# ------------------------------------------------------------------------------------ CUDA (Triton)

def _register_cuda():
    if importlib.util.find_spec("triton") is None:
        return

    @torch.library.register_kernel(_LIB + "multi_kv_attention", "cuda")
    def _mkv_cuda(q, ks, vs, kv_index, q_index, scale):
        scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale)
        return _mkv_gpu(q, ks, vs, kv_index, q_index, scale)

    @torch.library.register_kernel(_LIB + "multi_kv_attention_out", "cuda")
    def _mkv_out_cuda(q, ks, vs, kv_index, q_index, scale, out):
        scale = check_multi_kv(q, ks, vs, kv_index, q_index, scale, out)
        return _mkv_gpu(q, ks, vs, kv_index, q_index, scale, out)[1]

    @torch.library.register_kernel(_LIB + "segment_attention", "cuda")
    def _seg_cuda(q, k, v, cu_seqlens, group_mask, group_bias, scale):
        scale = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale)
        return _seg_gpu(q, k, v, cu_seqlens, group_mask, group_bias, scale)

    @torch.library.register_kernel(_LIB + "multi_kv_attention_backward", "cuda")
    def _mkv_bwd_cuda(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
        scale = check_multi_kv_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse)
        from .triton import multi_kv_attention_backward_triton
        return multi_kv_attention_backward_triton(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse)

    @torch.library.register_kernel(_LIB + "segment_attention_backward", "cuda")
    def _seg_bwd_cuda(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
        scale = check_segment_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out,
                                       lse)
        from .triton import segment_attention_backward_triton
        return segment_attention_backward_triton(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias,
                                                 scale, out, lse)


def _use_cudnn(op: str, ok: bool, requirement: str) -> bool:
    """Whether the cuDNN engine runs this call (DTK_SPARSE_ENGINE; auto: where it applies)."""
    engine = _config.get("sparse_engine")
    if engine == "cudnn" and not ok:
        raise ValueError(f"DTK_SPARSE_ENGINE=cudnn, but the cuDNN engine of {op} serves only {requirement}")
    return ok and (engine == "cudnn" or (engine == "auto" and not _dense.DENSE_FAILED))


def _cudnn_or_triton(run_cudnn, run_triton):
    """run_cudnn(); on a cuDNN error (a build or card without this attention) say so once and use
    the Triton engine from then on (_dense.DENSE_FAILED; DTK_SPARSE_ENGINE=cudnn re-raises)."""
    try:
        return run_cudnn()
    except RuntimeError as e:
        if _config.get("sparse_engine") == "cudnn":
            raise
        _dense.dense_failed("dtk sparse ops", e)
        return run_triton()


def _mkv_gpu(q, ks, vs, kv_index, q_index, scale, out=None):
    """The GPU engine for a multi_kv_attention call: cuDNN per dense segment + an exact lse merge
    where it applies (the fastest dense kernel), else the Triton engine."""
    from . import cudnn
    from .triton import multi_kv_attention_triton

    kv_index = list(kv_index) if kv_index else [None] * len(ks)
    triton_run = lambda: multi_kv_attention_triton(q, ks, vs, kv_index, q_index, scale, out=out)  # noqa: E731
    if _use_cudnn("multi_kv_attention", cudnn.supported(q, ks, kv_index),
                  f"CUDA fp16/bf16 calls with H_kv == H, D % 8 == 0, D <= 128, 1..{cudnn.MAX_SEGMENTS} "
                  "segments and no kv_index"):
        return _cudnn_or_triton(lambda: cudnn.multi_kv_attention_cudnn(q, ks, vs, q_index, scale, out), triton_run)
    return triton_run()


def _seg_gpu(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    """The GPU engine for a segment_attention call: cuDNN per (query branch, run of visible key
    branches) + lse merge when the branch layout is on the host, else the Triton engine."""
    from . import cudnn
    from .triton import segment_attention_triton

    triton_run = lambda: segment_attention_triton(q, k, v, cu_seqlens, group_mask, group_bias, scale)  # noqa: E731
    if _use_cudnn("segment_attention", cudnn.segment_supported(q, k, cu_seqlens, group_mask, group_bias),
                  "CUDA fp16/bf16 calls with H_kv == H, D % 8 == 0, D <= 128 and cu_seqlens, group_mask, "
                  "group_bias on the CPU"):
        return _cudnn_or_triton(
            lambda: cudnn.segment_attention_cudnn(q, k, v, cu_seqlens, group_mask, group_bias, scale), triton_run)
    return triton_run()


_register_cuda()
