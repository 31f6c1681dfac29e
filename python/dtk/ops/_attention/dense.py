"""Dense attention with its log-sum-exp on the fastest torch kernel, for the parts of sparse and
window problems that are plain dense attention (DESIGN §5: cuDNN is the fastest dense kernel on
Hopper), and the side streams that let several such calls, or one beside a Triton kernel, share
the GPU. On the CPU torch's flash attention stands in, so the code around it is tested there."""
from __future__ import annotations

import warnings

import torch


def dense_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether dense_with_lse takes (B, S, H, D) q and k: on a GPU fp16/bf16 with one K/V head per
    q head and a head dim cuDNN takes (D % 8 == 0, D <= 128); on the CPU any float dtype."""
    H, D = q.shape[2], q.shape[3]
    if k.shape[2] != H:
        return False
    if not q.is_cuda:
        return q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128 and torch.backends.cudnn.is_available()


def dense_with_lse(q, k, v, scale):
    """Dense attention of (B, H, n, D) views: (out (B, H, n, D), lse (B, H, n) float32, natural log)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


# The dense kernel's first error (a build or card without cuDNN attention): from then on the
# sparse and the window ops alike take their Triton paths instead.
DENSE_FAILED: list = []


def dense_failed(where: str, err: Exception) -> None:
    """Records the dense kernel's failure (see DENSE_FAILED) and says so, naming the op (`where`)."""
    DENSE_FAILED.append(err)
    warnings.warn(f"{where}: dense attention (cuDNN) failed ({str(err).splitlines()[0][:200]}); "
                  "using the Triton engine from now on")


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
