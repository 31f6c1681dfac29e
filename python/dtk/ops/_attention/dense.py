"""Dense attention with its log-sum-exp on the fastest torch kernel (cuDNN's attention on a GPU:
the fastest dense kernel measured, benchmarks/RESULTS.md), for the parts of sparse and window
problems that are plain dense attention, and the side streams that let several such calls, or one
beside a Triton kernel, share the GPU. On the CPU torch's flash attention stands in, so the code
around it is tested there. A failing call raises: the caller's engine module decides what serves
the call instead (docs/architecture.md, "The shared attention core")."""
from __future__ import annotations

from typing import Optional

import torch


def dense_unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """Why dense_with_lse does not take (B, S, H, D) q and k, or None when it does: on a GPU
    fp16/bf16 with one K/V head per q head and a head dim cuDNN takes (D % 8 == 0, D <= 128); on the
    CPU any of float32, float16, bfloat16. Inspects only shapes, dtypes and devices."""
    H, D = q.shape[2], q.shape[3]
    if k.shape[2] != H:
        return f"GQA (H_kv={k.shape[2]} != H={H}): the dense kernel needs one K/V head per q head"
    if not q.is_cuda:
        ok = q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return None if ok else f"q is {q.dtype}: the CPU dense kernel takes float32, float16 or bfloat16"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q is {q.dtype}: cuDNN attention takes float16 or bfloat16"
    if D % 8 or D > 128:
        return f"head dim D={D}: cuDNN attention takes D % 8 == 0 and D <= 128"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


def dense_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether dense_with_lse takes (B, S, H, D) q and k (dense_unsupported_reason says why not)."""
    return dense_unsupported_reason(q, k) is None


def dense_with_lse(q, k, v, scale):
    """Dense attention of (B, H, n, D) views: (out (B, H, n, D), lse (B, H, n) float32, natural log)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


_SIDE_STREAMS: dict = {}


def fork_streams(device: torch.device, n: int) -> list:
    """n side streams of `device` (made once and reused: dtk's only streams besides the caller's),
    each queued after the work already on the current stream; join_streams ends the fork."""
    pool = _SIDE_STREAMS.setdefault(device, [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device))
    cur = torch.cuda.current_stream(device)
    for side in pool[:n]:
        side.wait_stream(cur)
    return pool[:n]


def join_streams(streams: list) -> None:
    """The current stream waits for the work queued on `streams` (fork_streams' side streams)."""
    if streams:
        cur = torch.cuda.current_stream(streams[0].device)
        for side in streams:
            cur.wait_stream(side)


def concurrent_ok(t: torch.Tensor) -> bool:
    """Whether work on t's device may go to side streams: a GPU tensor, outside CUDA graph capture
    (where the caller's stream alone is used)."""
    return t.is_cuda and not torch.cuda.is_current_stream_capturing()


# Streams the dense calls of one op spread over (the caller's and 3 side streams): enough for the
# partial waves of a few calls to fill each other.
MAX_STREAMS = 4


def dense_with_lse_concurrent(calls, scale):
    """dense_with_lse of each (q, k, v) of `calls`. On a GPU the calls go round-robin to the
    caller's stream and up to MAX_STREAMS - 1 side streams, so each fills the last, partial wave of
    the others' thread blocks (one call's q rows x heads are rarely a multiple of the SM count);
    the results are ready on the caller's stream."""
    if len(calls) < 2 or not concurrent_ok(calls[0][0]):
        return [dense_with_lse(q, k, v, scale) for q, k, v in calls]
    device = calls[0][0].device
    cur = torch.cuda.current_stream(device)
    sides = fork_streams(device, min(len(calls), MAX_STREAMS) - 1)
    streams = [cur] + sides
    results = []
    for i, (q, k, v) in enumerate(calls):
        with torch.cuda.stream(streams[i % len(streams)]):
            results.append(dense_with_lse(q, k, v, scale))
    join_streams(sides)
    for i, (o, lse) in enumerate(results):
        if i % len(streams):   # made on a side stream, read on the caller's
            o.record_stream(cur)
            lse.record_stream(cur)
    return results
