"""cuDNN engine of the sparse-token ops, built from torch's cuDNN attention (the fastest dense
kernel measured on the GPUs of benchmarks/RESULTS.md) with its log-sum-exp, and one exact lse-merge
pass (merge.py). engine.py decides which calls come here (`can_run_cudnn`,
`can_run_cudnn_segment`); docs/architecture.md describes the engines.

multi_kv_attention, dense segments (no kv_index): one cuDNN call per K/V segment, merged and
written in place: compact rows, or scattered into `out`'s q_index rows. Sparse queries are
gathered once (a small copy: the edited rows only). The K/V segments are never concatenated.
The calls of one op run on side streams at once, so each fills the others' partial last wave.

segment_attention, when the branch layout is on the host (cu_seqlens, group_mask, group_bias as
CPU tensors: read without a device sync): per query branch, one cuDNN call per run of adjacent
visible key branches with one bias (a branch pair's bias shifts that call's lse), merged into the
branch's rows. Masked branch pairs are never computed.

The same code runs on the CPU with torch's CPU flash attention as the dense kernel (and the merge
kernel in Triton's interpreter), which is how the gather / merge / scatter logic is tested without
a GPU; on a GPU the Triton engine (triton.py) serves every case this one does not."""
from __future__ import annotations

import torch

from ..._debug import new_output
from .._attention.dense import dense_with_lse_concurrent
from .merge import merge_partials


def multi_kv_attention_cudnn(q, ks, vs, q_index, scale, out=None):
    """(out, lse) as multi_kv_attention_triton, for calls engine.can_run_cudnn accepts (and CPU
    tensors in tests). Empty segments are skipped; with every segment empty rows get 0 and lse -inf."""
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    lse = new_output((B, H, n), like=q, dtype=torch.float32)
    res = out if out is not None else new_output((B, n, H, D), like=q)
    qg = q
    if q_index is not None:
        rows = q_index.long().clamp_(0, S - 1)   # padding (-1) and the like read some row, discarded by the merge
        qg = torch.gather(q, 1, rows[:, :, None, None].expand(B, n, H, D))
    if n == 0:
        return res, lse
    parts = dense_with_lse_concurrent([(qg.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                                       for k, v in zip(ks, vs) if k.shape[1] > 0], scale)
    if not parts:   # no key at all: a zero block of cuDNN work is not a call to make
        parts = [(qg.new_zeros(B, H, n, D), qg.new_full((B, H, n), float("-inf"), dtype=torch.float32))]
    os_, ls = zip(*parts)
    merge_partials(list(os_), list(ls), res, lse, q_index=q_index, S=S, scatter=out is not None)
    return res, lse


def segment_attention_cudnn(q, k, v, cu_seqlens, group_mask, group_bias, scale):
    """(out, lse) as segment_attention_triton, for calls engine.can_run_cudnn_segment accepts (and
    CPU tensors in tests). A query branch that sees no key gets 0 and lse -inf."""
    B, S, H, D = q.shape
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    cu = cu_seqlens.tolist()
    mask = group_mask.tolist()
    bias = group_bias.double().tolist() if group_bias is not None else None
    G = len(cu) - 1
    branches, calls = [], []   # per branch (rows, its first call, its runs' biases); every dense call
    for a in range(G):
        q0, q1 = cu[a], cu[a + 1]
        if q0 == q1:
            continue
        qa = q[:, q0:q1].transpose(1, 2)
        runs = []   # (first key, end key, bias) of adjacent visible branches with one bias
        for b in range(G):
            if not mask[a][b] or cu[b] == cu[b + 1]:
                continue
            c = bias[a][b] if bias is not None else 0.0
            if runs and runs[-1][1] == cu[b] and runs[-1][2] == c:
                runs[-1][1] = cu[b + 1]
            else:
                runs.append([cu[b], cu[b + 1], c])
        branches.append(((q0, q1), len(calls), [c for _, _, c in runs]))
        calls += [(qa, k[:, k0:k1].transpose(1, 2), v[:, k0:k1].transpose(1, 2)) for k0, k1, _ in runs]
    # every branch's calls at once (side streams on a GPU), then one merge per branch
    results = dense_with_lse_concurrent(calls, scale)
    for (q0, q1), first, biases in branches:
        rows_out, rows_lse = out[:, q0:q1], lse[:, :, q0:q1]
        if not biases:
            rows_out.zero_()
            rows_lse.fill_(float("-inf"))
            continue
        mine = results[first:first + len(biases)]
        merge_partials([o for o, _ in mine], [l + c if c else l for (_, l), c in zip(mine, biases)],
                       rows_out, rows_lse)
    return out, lse
