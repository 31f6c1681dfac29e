"""Dense attention with its log-sum-exp on the fastest torch kernel, for the parts of sparse and
window problems that are plain dense attention (DESIGN §5: cuDNN is the fastest dense kernel on
Hopper). On the CPU torch's flash attention stands in, so the code around it is tested there."""
from __future__ import annotations

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
