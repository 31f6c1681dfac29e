"""A plain dense attention forward in Triton with tensor-descriptor (TMA) loads, with and without
Hopper warp specialization (`tl.range(..., warp_specialize=True)`: a producer warp group loading,
consumer warp groups computing, registers moved to them by setmaxnreg, as FlashAttention-3 does by
hand). Not a dtk op: a probe that window_sweep's dense control times next to the window engine's
raw rate, FlexAttention and cuDNN, to tell whether moving the engine's full-block work to this
structure is worth it on the card.

Triton 3.6 and 3.8 warp-specialize this loop on sm_90 at 64-row query blocks with 4 warps per
group (12 warps, setmaxnreg), key blocks listed or not; at 128 rows and 4 warps the pass fails, at
8 warps it leaves the loop as it is; 3 stages exceed shared memory (checked AOT, no GPU)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# (name, warp_specialize, indexed, block_m, block_n, num_warps, num_stages) of the probe's variants;
# indexed: each key block's first row read from a list, as the window engine's plan gives them
VARIANTS = [("TMA", False, False, 128, 128, 8, 2), ("TMA + warp specialization", True, False, 64, 128, 4, 2),
            ("TMA + warp specialization, listed key blocks", True, True, 64, 128, 4, 2)]


@triton.jit
def _probe_fwd(desc_q, desc_k, desc_v, desc_o, BLOCKS, S, qk_scale,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, INDEXED: tl.constexpr):
    # q, k, v, o are (batch x heads x S, D) row blocks; S is a multiple of BM and BN; BLOCKS lists
    # the S / BN key blocks' first rows (read when INDEXED)
    row0 = tl.program_id(1) * S
    rows = row0 + tl.program_id(0) * BM
    q = desc_q.load([rows, 0])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for j in tl.range(0, S // BN, warp_specialize=WS):
        if INDEXED:
            key0 = row0 + tl.load(BLOCKS + j)
        else:
            key0 = row0 + j * BN
        k = desc_k.load([key0, 0])
        s = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([key0, 0])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    desc_o.store([rows, 0], (acc / l_i[:, None]).to(desc_o.dtype))


def probe_fn(q, k, v, scale: float, warp_specialize: bool, indexed: bool, block_m: int, block_n: int,
             num_warps: int, num_stages: int):
    """A callable running the probe on (B, S, H, D) q, k, v (one K/V head per q head, S a multiple
    of both blocks), returning (B, S, H, D); the head-major copies it reads are made here, once,
    outside what the callable does."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, S, H, D = q.shape
    if S % block_m or S % block_n or k.shape[2] != H:
        raise ValueError(f"the probe needs S a multiple of {block_m} and {block_n} and MHA, got {tuple(q.shape)}")
    qh, kh, vh = (x.transpose(1, 2).reshape(B * H * S, D).contiguous() for x in (q, k, v))
    out = torch.empty_like(qh)
    dq, do = (TensorDescriptor.from_tensor(x, [block_m, D]) for x in (qh, out))
    dk, dv = (TensorDescriptor.from_tensor(x, [block_n, D]) for x in (kh, vh))
    blocks = torch.arange(0, S, block_n, dtype=torch.int32, device=q.device)

    def run():
        _probe_fwd[(S // block_m, B * H)](dq, dk, dv, do, blocks, S, scale * LOG2E, BM=block_m, BN=block_n, D=D,
                                          WS=warp_specialize, INDEXED=indexed, num_warps=num_warps,
                                          num_stages=num_stages)
        return out.view(B, H, S, D).transpose(1, 2)
    return run
