"""The single-loop engine of window attention (forward only), for Hopper warp specialization:
served only where the caller pins it (``dtk.config(window_engine="triton-single-loop")`` or
``dtk.window_attention(..., engine="triton-single-loop")``), as no GPU run has measured it against
the main engine yet (the benchmark's dtk-ws row and window_sweep's single-loop rows do).

The main engine (triton.py) walks a query block's key blocks in up to seven loops, one per kind of
block; Triton's automatic warp specialization (a producer warp group issuing TMA copies, consumer
groups computing, as FlashAttention-3 does by hand) fails on that kernel (its pass manager errors
at 64-row blocks and 4 warps, and ignores 8 warps). This engine gives it one uniform loop instead:
per query block (64 rows) a list of key blocks, each with its number of valid columns and whether
the window must be tested on it, holding the prefix (text) key blocks, the full blocks and the
partial blocks of the plan's key shape alike. Every block is masked the same way (columns past
its keys; the window relative to the block's origin where it is partial), so the loop body has no
branch. It serves the forward of grid queries only: the prefix query rows go to the dense kernel
(prefix.py). engine.py says which problems it cannot take (extra keys, edge tiles whose partial
blocks have another shape, layouts TMA cannot address, head dims over 128, a GPU before Hopper)."""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .._attention.triton import LOG2E, finish, head_indices, online_update, tile_offsets
from .plan import build_plan
from .spec import WindowSpec
from .triton_geometry import block_desc, coords, limiting_axes, local_allowed, local_offsets, query_windows, window_args

# Query rows per program, keys per block and the default launch on a GPU: Triton warp-specializes
# the loop at 64 rows and 4 warps (12 warps in all), not at 128; its consumer warps get 168
# registers, which hold 64-key blocks without spilling and spill in the loop at 128 keys (AOT on
# sm_90a, tests/ops/window/test_triton_compile.py). The interpreter takes 16-key blocks (small tests).
BLOCK_Q = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2


def key_block(device: torch.device) -> int:
    """Keys per block: BLOCK_K on a GPU, 16 in the interpreter."""
    return BLOCK_K if device.type == "cuda" else 16


def tma_descriptors(tensors, block_rows: int, block_d: int):
    """(B, S, H, D) tensors as (B, H, S, D) tensor descriptors of (block_rows, block_d) tiles for
    TMA copies, or None where the layout does not suit TMA (every stride but the last a multiple of
    16 bytes, 16-byte-aligned data, a contiguous last dim, no empty dim)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    descs = []
    for t in tensors:
        B, S, H, D = t.shape
        strides = (t.stride(0), t.stride(2), t.stride(1))
        aligned = t.data_ptr() % 16 == 0 and all(x * t.element_size() % 16 == 0 for x in strides)
        if min(B, S, H, D) == 0 or t.stride(3) != 1 or not aligned:
            return None
        descs.append(TensorDescriptor(t, [B, H, S, D], [*strides, 1], [1, 1, block_rows, block_d]))
    return descs


@triton.jit(do_not_specialize=["S", "NQB", "L", "KE1", "KE2", "N0", "N1", "N2", "W0", "W1", "W2", "R", "PAD0",
                                "PAD1"])
def _window_fwd_ws(
    QD, O, LSE, KD, VD, QB, WENT, WCNT, ORDER,
    sob, sos, soh,
    H, GROUP, S, NQB, L, D, KE1, KE2,
    N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1,
    qk_scale,
    IS_BOX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    AXES: tl.constexpr, WS: tl.constexpr,
):
    # One program per (grid query block, batch x head), the query block fastest (neighbouring
    # windows share keys in L2), in the plan's heaviest-first order. Key block j of query block qb
    # is row j of WENT[qb]: (first key row, origin (3), columns | test << 16). Q, K and V arrive by
    # TMA copies from (B, H, S, D) descriptors (a pointer-loaded q stops the warp specialization);
    # rows past S come as zeros, rows past the query block are computed and not stored.
    t = tl.program_id(0)
    qb = tl.load(ORDER + t % NQB).to(tl.int64)
    bh = t // NQB
    b, h, kvh = head_indices(bh, H, GROUP)
    offs_m, offs_n, offs_d, d_mask = tile_offsets(D, BLOCK_M, BLOCK_N, BLOCK_D)
    q_start, qo0, qo1, qo2, qe0, qe1, qe2 = block_desc(QB, qb)
    rows_q = (q_start + offs_m).to(tl.int64)
    q_ok = offs_m < qe0 * qe1 * qe2
    b32 = b.to(tl.int32)
    kvh32 = kvh.to(tl.int32)
    q = QD.load([b32, h.to(tl.int32), q_start, 0]).reshape(BLOCK_M, BLOCK_D)
    x0, x1, x2 = coords(offs_m, qo0, qo1, qo2, qe1, qe2)
    lo0, lo1, lo2, hi0, hi1, hi2 = query_windows(x0, x1, x2, N0, N1, N2, W0, W1, W2, R, INWARD, PAD0, PAD1, IS_BOX)
    sp0, sp1, sp2 = hi0 - lo0, hi1 - lo1, hi2 - lo2
    lp = local_offsets(offs_n, KE1, KE2)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ent_ptr = WENT + qb * L * 5
    for j in tl.range(0, tl.load(WCNT + qb), warp_specialize=WS):
        e = ent_ptr + j * 5
        start = tl.load(e)
        cols = tl.load(e + 4)
        k = KD.load([b32, kvh32, start, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k))
        inside = local_allowed(lp, 0, lo0 - tl.load(e + 1), lo1 - tl.load(e + 2), lo2 - tl.load(e + 3), sp0, sp1,
                                sp2, R, IS_BOX, AXES, False)
        allowed = (offs_n < (cols & 0xFFFF))[None, :] & (inside | ((cols >> 16) == 0))
        s = tl.where(allowed, s, float("-inf"))
        v = VD.load([b32, kvh32, start, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, m_i, l_i = online_update(s, qk_scale, acc, m_i, l_i, v, 0.0, False)
    out, lse = finish(acc, m_i, l_i)
    tl.store(O + b * sob + h * soh + rows_q[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * S + rows_q, lse, mask=q_ok)


@lru_cache(maxsize=16)
def ws_plan(spec: WindowSpec, block_k: int, device: torch.device):
    """(plan, entries (n, L', 5) int32, counts (n,) int32) of the single loop at BLOCK_Q-row query
    blocks, or None when the plan has partial blocks of another shape than its key shape (edge
    tiles: their masks need the grid coordinates of every key, which the loop does not read).
    Each query block's list: the prefix key blocks, then the plan's full and partial blocks."""
    plan = build_plan(spec, BLOCK_Q, block_k, device)
    cnt = plan.kv_count
    if bool((cnt[:, 4] != cnt[:, 3]).any()):
        return None
    ent = plan.entries.to(torch.int32)
    cols = ent[..., 4] * ent[..., 5] * ent[..., 6]
    test = (ent[..., 7] == 0).to(torch.int32)
    grid_ent = torch.stack([ent[..., 0], ent[..., 1], ent[..., 2], ent[..., 3], cols | (test << 16)], -1)
    P = spec.num_prefix
    starts = torch.arange(0, P, block_k, device=device, dtype=torch.int32)
    zero = torch.zeros_like(starts)
    pre = torch.stack([starts, zero, zero, zero, (P - starts).clamp(max=block_k)], -1)
    pre = pre[None].expand(plan.num_blocks, -1, -1)
    entries = torch.cat([pre, grid_ent], 1).contiguous()
    return plan, entries, (cnt[:, 3] + starts.numel()).to(torch.int32).contiguous()


def single_loop_forward(q, k, spec: WindowSpec, scale: float, out, lse, inputs, *, launch):
    """Writes the grid query rows of (out, lse) by the single-loop kernel. `inputs`: (plan,
    entries, counts, q descriptors, k / v descriptors, key block, head-dim block), see engine.py;
    `launch` = (num_warps, num_stages). The prefix rows are the caller's (the dense kernel)."""
    plan, entries, counts, qd, kv, block_k, block_d = inputs
    B, S, H, D = q.shape
    if plan.num_blocks * B * H:
        gpu = q.device.type == "cuda"
        _window_fwd_ws[(plan.num_blocks * B * H,)](
            *qd, out, lse, *kv, plan.q_blocks, entries, counts, plan.order,
            out.stride(0), out.stride(1), out.stride(2),
            H, H // k.shape[2], S, plan.num_blocks, entries.shape[1], D, plan.key_shape[1], plan.key_shape[2],
            *window_args(spec), scale * LOG2E,
            IS_BOX=spec.window is not None, BLOCK_M=BLOCK_Q, BLOCK_N=block_k, BLOCK_D=block_d,
            AXES=limiting_axes(spec), WS=gpu, num_warps=launch[0], num_stages=launch[1])
    return out, lse
