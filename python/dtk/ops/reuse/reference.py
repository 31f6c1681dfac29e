"""Reference implementations of the cache / token-selection ops (plain PyTorch, loops where that
is clearer; float64-capable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scatter_blend_reference(base, cache, fresh, index, lam):
    """Returns (out, new_cache) without touching the inputs."""
    B = base.shape[0]
    cache = cache.clone()
    sb = base.clone()
    idx = index.long()
    idx = idx.expand(B, -1) if idx.dim() == 1 else idx
    for b in range(B):
        ok = idx[b] >= 0
        cache[b, idx[b][ok]] = fresh[b][ok]
        sb[b, idx[b][ok]] = fresh[b][ok]
    if isinstance(lam, torch.Tensor):
        lam = lam.to(base.device, torch.float64 if base.dtype == torch.float64 else torch.float32)
        lam = lam.reshape(-1).expand(B).reshape((B,) + (1,) * (base.dim() - 1))
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = (1 - lam) * sb.to(acc) + lam * cache.to(acc)
    return out.to(base.dtype), cache


def token_change_score_reference(features, reference, pool=2, size=None):
    acc = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    if size is None:
        size = tuple(features[0].shape[-2:])
    total = 0
    for f, r in zip(features, reference):
        f, r = F.normalize(f.to(acc), dim=1), F.normalize(r.to(acc), dim=1)
        d = (f - r).square().sum(1, keepdim=True)
        if tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        total = total + d
    total = total / len(features)
    if pool > 1:
        total = F.avg_pool2d(total, pool)
    return total[:, 0]


def mask_to_index_reference(mask, max_count=None, num_prefix=0):
    B, N = mask.shape
    n_max = num_prefix + N if max_count is None else max_count
    index = torch.full((B, n_max), -1, dtype=torch.int32)
    count = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        ids = list(range(num_prefix)) + [num_prefix + i for i in range(N) if bool(mask[b, i])]
        count[b] = len(ids)
        ids = ids[:n_max]
        index[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return index, count


def dilate_mask_reference(mask, iterations=1):
    m = mask.clone()
    for _ in range(iterations):
        p = F.pad(m, (1, 1, 1, 1))
        h, w = m.shape[-2:]
        n = torch.zeros_like(m)
        for dy in range(3):
            for dx in range(3):
                n |= p[:, dy:dy + h, dx:dx + w]
        m = n
    return m


def prune_isolated_reference(mask, min_neighbors=1):
    p = F.pad(mask.int(), (1, 1, 1, 1))
    h, w = mask.shape[-2:]
    cnt = torch.zeros(mask.shape, dtype=torch.int32)
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                continue
            cnt += p[:, dy:dy + h, dx:dx + w]
    return mask & (cnt >= min_neighbors)
