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
