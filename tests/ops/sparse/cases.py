"""Random inputs shared by the sparse-family tests."""
import torch

from ...helpers import bshd


def segments(B, lens, Hkv, D, dtype, transposed=False):
    ks = [bshd(B, L, Hkv, D, dtype, transposed=transposed) for L in lens]
    vs = [bshd(B, L, Hkv, D, dtype, transposed=transposed) for L in lens]
    return ks, vs


def random_kv_index(B, L, m, per_batch, pad=True):
    """Random key subset (with repeats and -1 padding) of a segment of length L."""
    shape = (B, m) if per_batch else (m,)
    if L == 0:
        return torch.full(shape, -1, dtype=torch.int64)
    idx = torch.randint(0, L, shape)
    if pad and m:
        idx[..., -1] = -1
    return idx.to(torch.int32 if per_batch else torch.int64)


def random_q_index(B, S, n, pad=True):
    """(B, n) distinct query rows (padding -1 at the end when pad)."""
    n = min(n, S)
    idx = torch.stack([torch.randperm(S)[:n] for _ in range(B)]) if n else torch.zeros(B, 0, dtype=torch.int64)
    if pad and n > 1:
        idx[0, -1] = -1
    return idx


def multi_kv_case(dtype, nseg):
    """A multi_kv_attention call of nseg segments (one empty): q (2, 21, 4, 16) transposed, GQA
    with 2 kv heads, kv_index None / shared (m,) / per-batch (B, m) with repeats and padding."""
    B, S, H, Hkv, D = 2, 21, 4, 2, 16
    lens = [17, 0, 33, 5, 16, 9][:nseg]
    q = bshd(B, S, H, D, dtype, transposed=True)
    ks, vs = segments(B, lens, Hkv, D, dtype)
    kv_index = [None if i % 2 == 0 else random_kv_index(B, L, 9, per_batch=i == 1) for i, L in enumerate(lens)]
    return q, ks, vs, kv_index
