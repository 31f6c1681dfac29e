"""Which engine serves a CUDA call of the sparse-token ops (docs/architecture.md, "Engines and
configuration"): the one place that reads `dtk.config(sparse_engine=...)`.

Forwards (multi_kv_attention, multi_kv_attention_out, segment_attention):

- "cudnn": torch's cuDNN attention per dense part with its lse, and one exact lse-merge pass
  (cudnn.py, merge.py). It serves MHA fp16/bf16 CUDA calls with a head dim cuDNN takes, and
  multi_kv_attention with 1..MAX_SEGMENTS dense segments (no kv_index), segment_attention with the
  branch layout on the host. `can_run_cudnn` / `can_run_cudnn_segment` say why it cannot serve a
  call.
- "triton": the Triton kernels (triton.py); they serve every call the checks accept.
- "auto" (the default): cuDNN where it serves the call, else Triton. Where cuDNN fails at run time
  (a build or card without its attention) that call is served by Triton, with a warning once per
  problem (`_config.fallback_warning`); the next call tries cuDNN again.

Pinning "cudnn" on a call it cannot serve raises ValueError with the reason. The backwards are
Triton's. Each call notes its engine (`dtk.last_engine(op)`). CPU tensors never come here: the C++
kernels serve them (the wrappers note "cpp").
"""
from __future__ import annotations

import contextlib
from typing import Optional

from ... import _config
from .._attention.dense import dense_unsupported_reason

# Segments the cuDNN engine merges in one pass: merge.MAX_PARTS (kept here so that this module, which
# the wrappers import, needs no Triton; tests/ops/sparse/test_engine.py checks the two agree).
MAX_SEGMENTS = 4

_MKV_SERVES = (f"CUDA fp16/bf16 calls with H_kv == H, D % 8 == 0, D <= 128, 1..{MAX_SEGMENTS} segments "
               "and no kv_index")
_SEG_SERVES = ("CUDA fp16/bf16 calls with H_kv == H, D % 8 == 0, D <= 128 and cu_seqlens, group_mask, group_bias "
               "on the CPU")


def _dense_reason(q, k) -> Optional[str]:
    if not q.is_cuda:
        return f"q is on {getattr(q, 'device', 'the CPU')}, not a CUDA device"
    return dense_unsupported_reason(q, k)


def _verdict(op: str, serves: str, reason: Optional[str], raise_error: bool) -> bool:
    if reason is not None and raise_error:
        raise ValueError(f"sparse_engine='cudnn', but the cuDNN engine of {op} cannot serve this call: {reason} "
                         f"(it serves {serves})")
    return reason is None


def can_run_cudnn(q, ks, kv_index=None, *, raise_error: bool = False) -> bool:
    """Whether the cuDNN engine serves a multi_kv_attention call with query q, K segments ks and
    kv_index (one entry per segment; None: none). If not: False, or with raise_error a ValueError
    saying why. Inspects only shapes, dtypes and devices (meta tensors do)."""
    reason = None
    if not 0 < len(ks) <= MAX_SEGMENTS:
        reason = f"{len(ks)} K/V segments (1..{MAX_SEGMENTS} merge in one pass)"
    elif kv_index is not None and any(i is not None for i in kv_index):
        reason = "a segment has a kv_index (the cuDNN engine takes dense segments)"
    else:
        reason = next((r for r in (_dense_reason(q, k) for k in ks) if r is not None), None)
    return _verdict("multi_kv_attention", _MKV_SERVES, reason, raise_error)


def can_run_cudnn_segment(q, k, cu_seqlens, group_mask, group_bias=None, *, raise_error: bool = False) -> bool:
    """Whether the cuDNN engine serves a segment_attention call: MHA fp16/bf16 CUDA tensors with a
    head dim cuDNN takes, and the branch layout (cu_seqlens, group_mask, group_bias) on the host,
    which it reads without a device sync. If not: False, or with raise_error a ValueError saying why."""
    reason = _dense_reason(q, k)
    if reason is None:
        on_device = [n for n, t in (("cu_seqlens", cu_seqlens), ("group_mask", group_mask), ("group_bias", group_bias))
                     if t is not None and t.device.type != "cpu"]
        if on_device:
            reason = f"{', '.join(on_device)} on {q.device}, not on the CPU (the engine plans on the host)"
    return _verdict("segment_attention", _SEG_SERVES, reason, raise_error)


def _choose(can_run) -> str:
    """The engine of a CUDA call: "cudnn" or "triton"; a pinned cuDNN that cannot serve raises."""
    engine = _config.get("sparse_engine")
    if engine == "triton":
        return "triton"
    return "cudnn" if can_run(engine == "cudnn") else "triton"


def _serve(ops, key, engine, run_cudnn, run_triton):
    """run_cudnn() or run_triton() as chosen; a cuDNN failure under "auto" falls back to Triton for
    this call (a pinned cuDNN re-raises). Notes the engine under each name of `ops`."""
    if engine == "cudnn":
        try:
            res = run_cudnn()
        except RuntimeError as e:
            if _config.get("sparse_engine") == "cudnn":
                raise
            _config.fallback_warning(f"dtk.{ops[0]} (cuDNN engine)", key, e, "the Triton engine")
            engine, res = "triton", run_triton()
    else:
        res = run_triton()
    for op in ops:
        _config.record_engine(op, engine)
    return res


def _shapes(ts):
    return tuple(None if t is None else tuple(t.shape) for t in ts)


def multi_kv_attention(q, ks, vs, kv_index, q_index, scale, out=None):
    """(out, lse) of a checked CUDA multi_kv_attention call (with `out`: its q_index rows written in
    place, the multi_kv_attention_out op) on the engine that serves it."""
    from .._attention.triton import default_blocks
    from . import cudnn
    from .triton import multi_kv_attention_triton

    kv_index = list(kv_index) if kv_index else [None] * len(ks)
    engine = _choose(lambda pinned: can_run_cudnn(q, ks, kv_index, raise_error=pinned))
    ops = ("multi_kv_attention",) if out is None else ("multi_kv_attention_out", "multi_kv_attention")
    key = (ops[0], _shapes([q, *ks]), q.dtype, str(q.device), None if q_index is None else q_index.shape[1])
    return _serve(ops, key, engine,
                  lambda: cudnn.multi_kv_attention_cudnn(q, ks, vs, q_index, scale, out),
                  lambda: multi_kv_attention_triton(q, ks, vs, kv_index, q_index, scale, out=out,
                                                    block=default_blocks(q.device)))


def segment_attention(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    """(out, lse) of a checked CUDA segment_attention call on the engine that serves it."""
    from .._attention.triton import default_blocks
    from . import cudnn
    from .triton import segment_attention_triton

    engine = _choose(lambda pinned: can_run_cudnn_segment(q, k, cu_seqlens, group_mask, group_bias,
                                                          raise_error=pinned))
    key = ("segment_attention", _shapes([q, k]), q.dtype, str(q.device), cu_seqlens.numel())
    return _serve(("segment_attention",), key, engine,
                  lambda: cudnn.segment_attention_cudnn(q, k, v, cu_seqlens, group_mask, group_bias, scale),
                  lambda: segment_attention_triton(q, k, v, cu_seqlens, group_mask, group_bias, scale,
                                                   block=default_blocks(q.device)))


def multi_kv_attention_backward(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse):
    """(dq, dks, dvs) of a checked CUDA call: the Triton engine."""
    from .._attention.triton import backward_block
    from .triton import multi_kv_attention_backward_triton

    _config.record_engine("multi_kv_attention_backward", "triton")
    return multi_kv_attention_backward_triton(grad_out, grad_lse, q, ks, vs, kv_index, q_index, scale, out, lse,
                                              block=backward_block(q.device))


def segment_attention_backward(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale, out, lse):
    """(dq, dk, dv) of a checked CUDA call: the Triton engine."""
    from .._attention.triton import backward_block
    from .triton import segment_attention_backward_triton

    _config.record_engine("segment_attention_backward", "triton")
    return segment_attention_backward_triton(grad_out, grad_lse, q, k, v, cu_seqlens, group_mask, group_bias, scale,
                                             out, lse, block=backward_block(q.device))


def check_engine_name(engine) -> None:
    """The `engine=` argument of the wrappers: None or one of sparse_engine's choices."""
    choices = _config.OPTIONS["sparse_engine"].choices
    if engine is not None and engine not in choices:
        raise ValueError(f"engine must be one of {', '.join(map(repr, choices))} (or None: dtk.config's "
                         f"sparse_engine), got {engine!r}")


def pinned(engine):
    """The scope of a wrapper call: `dtk.config(sparse_engine=engine)` when engine is given."""
    check_engine_name(engine)
    return contextlib.nullcontext() if engine is None else _config.config(sparse_engine=engine)

