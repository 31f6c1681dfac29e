"""The prefix (text) query rows of window attention attend to every sequence key: plain dense
attention, which the dense kernel (cuDNN, ops/_attention/dense.py) runs faster than the window
engines' own prefix programs (measured in benchmarks/RESULTS.md, dense-control in
benchmarks/window_sweep.py). engine.py decides whether a call's prefix rows go there
(the window_prefix_by_dense setting)."""
from __future__ import annotations

import torch

from .._attention.dense import concurrent_ok, dense_with_lse, fork_streams


def start_prefix_dense(q, k, v, out, lse, P: int, scale: float):
    """Rows [0, P) of (out, lse) as one dense attention call over every sequence key (not the
    extra keys, which only grid queries see). On a GPU it is queued on a side stream after the
    work already on the current one (so it overlaps what is launched next), unless a CUDA graph
    is being captured; returns the stream the caller joins once its own launches are queued (or
    None). Raises what the dense kernel raises."""
    def run():
        o, l = dense_with_lse(q[:, :P].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        out[:, :P].copy_(o.transpose(1, 2))
        lse[:, :, :P].copy_(l)
    if not concurrent_ok(q):
        run()
        return None
    (side,) = fork_streams(q.device, 1)
    with torch.cuda.stream(side):
        run()
    return side
