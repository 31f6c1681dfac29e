"""cuDNN engine of multi_kv_attention for dense segments (no kv_index): each K/V segment is one
call of torch's cuDNN attention (the fastest dense kernel on Hopper, DESIGN §5) returning its
log-sum-exp, and one Triton pass (merge.py) merges the partial outputs exactly through their lse, writing
the result in place: compact rows, or scattered into `out`'s q_index rows. Sparse queries are
gathered once (a small copy: the edited rows only). The K/V segments are never concatenated.

The same code runs on the CPU with torch's CPU flash attention as the dense kernel (and the merge
kernel in Triton's interpreter), which is how the gather / merge / scatter logic is tested without
a GPU; on a GPU the Triton engine (triton.py) serves every case this one does not."""
from __future__ import annotations

import torch

from ..._debug import new_output
from .merge import MAX_PARTS, merge_partials

MAX_SEGMENTS = MAX_PARTS   # one merge pass


def supported(q, ks, kv_index) -> bool:
    """Whether this engine serves the call: a CUDA fp16/bf16 q, one K/V head per q head, a head
    dim cuDNN takes, at most MAX_SEGMENTS segments, none of them indexed."""
    H, D = q.shape[2], q.shape[3]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 128
            and 0 < len(ks) <= MAX_SEGMENTS and all(k.shape[2] == H for k in ks)
            and all(i is None for i in kv_index))


def _dense_with_lse(q, k, v, scale):
    """Dense attention of (B, H, n, D) views: (out (B, H, n, D), lse (B, H, n) float32, natural log)."""
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


def multi_kv_attention_cudnn(q, ks, vs, q_index, scale, out=None):
    """(out, lse) as multi_kv_attention_triton, for calls `supported` accepts (and CPU tensors in
    tests). Empty segments are skipped; with every segment empty rows get 0 and lse -inf."""
    B, S, H, D = q.shape
    n = S if q_index is None else q_index.shape[1]
    lse = new_output((B, H, n), like=q, dtype=torch.float32)
    res = out if out is not None else new_output((B, n, H, D), like=q)
    qg = q
    if q_index is not None:
        rows = torch.where((q_index >= 0) & (q_index < S), q_index, 0).long()   # padding: row 0, discarded
        qg = torch.gather(q, 1, rows[:, :, None, None].expand(B, n, H, D))
    if n == 0:
        return res, lse
    parts = [_dense_with_lse(qg.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
             for k, v in zip(ks, vs) if k.shape[1] > 0]
    if not parts:   # no key at all: a zero block of cuDNN work is not a call to make
        parts = [(qg.new_zeros(B, H, n, D), qg.new_full((B, H, n), float("-inf"), dtype=torch.float32))]
    os_, ls = zip(*parts)
    merge_partials(list(os_), list(ls), res, lse, q_index=q_index, S=S, scatter=out is not None)
    return res, lse
