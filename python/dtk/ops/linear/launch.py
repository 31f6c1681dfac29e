"""Launch configurations of the linear-attention Triton kernels (no Triton import): the block sizes,
warps and stages each launcher may use, how a sequence is split into chunks, and the launch
parameters (``Launch``) that ``engine.py`` reads from ``dtk.config`` and passes to the launchers.

On a GPU the streaming kernels are autotuned over ``launch_configs``' list (keyed on the head
dims, dtype and flags); in the interpreter the first entry is used.
tests/ops/linear/test_triton_compile.py compiles each of them for sm_80 and sm_90.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .._linear_core import next_pow2

# Streaming kernels: (rows per block, num_warps, num_stages) tried by the GPU autotuner, by the
# padded head dim (BLOCK_D <= 128 / 256). Every entry must fit the shared memory of sm_80 and sm_90
# (tests/ops/linear/test_triton_compile.py compiles them all).
_GPU_ROWS = {
    "state": {128: [(64, 8, 3), (64, 8, 4), (128, 8, 2), (64, 4, 3)],
              256: [(32, 8, 3), (64, 8, 2), (32, 4, 3)]},
    "apply": {128: [(128, 8, 2), (128, 8, 3), (64, 4, 3)],
              256: [(64, 8, 2), (64, 8, 3)]},
    "grad_q": {128: [(64, 8, 2), (64, 4, 2)]},
    "grad_kv": {128: [(64, 8, 2), (64, 4, 3)]},
    # head dims above backward_whole_tiles': Dv streamed in blocks (64 rows: wgmma needs 64 per
    # warpgroup)
    "grad_rows": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (64, 8, 3)]},
    "grad_s_wide": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (32, 8, 3)]},
    "grad_feature": {128: [(64, 8, 2), (64, 4, 3)], 256: [(64, 8, 2), (64, 8, 3)]},
}
# The interpreter runs one fixed, small configuration.
_INTERP_ROWS = {"state": 64, "apply": 64, "grad_q": 32, "grad_kv": 32, "grad_rows": 32, "grad_s_wide": 32,
                "grad_feature": 32}
ROW_NAME = {"state": "BLOCK_S", "apply": "BLOCK_M", "grad_q": "BLOCK_M", "grad_kv": "BLOCK_M",
            "grad_rows": "BLOCK_M", "grad_s_wide": "BLOCK_M", "grad_feature": "BLOCK_M"}
# Each kernel's "module:function" under dtk.ops.linear.
KERNELS = {"state": "triton_forward:_state_kernel", "apply": "triton_forward:_apply_kernel",
           "grad_q": "triton_backward:_grad_q_kernel", "grad_kv": "triton_backward:_grad_kv_kernel",
           "grad_rows": "triton_backward:_grad_rows_kernel", "grad_s_wide": "triton_backward:_grad_s_wide_kernel",
           "grad_feature": "triton_backward:_grad_feature_kernel"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """The launch parameters of one call (engine.launch_params reads them from dtk.config):

    * ``ks_dot``: the state kernel sums phi(k) over rows as a second (D x 16) tensor-core dot
      beside the state's (no cross-thread work in the loop), else a tl.sum across threads every step;
    * ``den_dot``: the apply kernel's denominators phi(q).z as a small dot (z split hi + lo for
      16-bit operands), else a per-row reduction across threads;
    * ``programs_per_sm``: programs per SM the streaming kernels split a sequence into (more give
      more parallelism, but the state kernel adds one more fp32 state per program and the apply
      kernel reads one more);
    * ``atomic``: the state kernel's chunks add into a zeroed state with fp32 atomics, else each
      writes its own slot, summed by one torch reduction (deterministic; always so under
      torch.use_deterministic_algorithms);
    * ``autotune``: several candidate configurations are timed by Triton's autotuner, else the first
      is launched;
    * ``configs``: the function listing a kernel's candidates (``launch_configs``).

    Which variant is faster is for benchmarks/linear_sweep.py on a GPU to say (measured in
    benchmarks/RESULTS.md)."""
    ks_dot: bool
    den_dot: bool
    programs_per_sm: int
    atomic: bool
    autotune: bool
    configs: Callable = None

    def candidates(self, kernel: str, D: int, Dv: int, dtype: torch.dtype, gpu: bool) -> list:
        cfgs = (self.configs or launch_configs)(kernel, D, Dv, dtype, gpu)
        return cfgs if self.autotune else cfgs[:1]


def backward_whole_tiles(D: int, Dv: int) -> bool:
    """Whether the backward holds whole D x Dv tiles on chip (grad_q, grad_kv: q and g read once);
    above, the state streams in Dv blocks (grad_rows, grad_s_wide, grad_feature, and apply for dv)."""
    return next_pow2(D) <= 128 and next_pow2(Dv) <= 128


def launch_configs(kernel: str, D: int, Dv: int, dtype: torch.dtype = torch.bfloat16, gpu: bool = True) -> list:
    """Every launch configuration the launcher of `kernel` (a key of KERNELS) may use for head dims
    D, Dv: dicts of the block-size constexprs plus num_warps and num_stages. On a GPU the list is
    what the autotuner chooses from (a single entry: used as is); in the interpreter one entry.
    The whole-tile backward kernels (grad_q, grad_kv) have none above backward_whole_tiles."""
    BLOCK_D = next_pow2(D)
    if kernel in ("state", "apply"):
        BLOCK_DV = min(next_pow2(Dv), 64 if BLOCK_D > 128 else 128)
    elif kernel in ("grad_q", "grad_kv"):
        if not backward_whole_tiles(D, Dv):
            return []
        BLOCK_DV = next_pow2(Dv)
    elif kernel in ("grad_rows", "grad_s_wide", "grad_feature"):   # any head dims (engine.py may force them)
        BLOCK_DV = min(next_pow2(Dv), 64 if BLOCK_D > 128 else 128)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    rows = ROW_NAME[kernel]
    if not gpu:
        return [{rows: _INTERP_ROWS[kernel], "BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "num_warps": 4,
                 "num_stages": 1}]
    table = _GPU_ROWS[kernel]
    entries = table[128] if BLOCK_D <= 128 else table[256]
    if dtype in (torch.float32, torch.float64):  # fp32 operands: twice the shared memory per tile
        entries = [(min(r, 32), w, min(s, 2)) for r, w, s in entries]
        entries = list(dict.fromkeys(entries))
    return [{rows: r, "BLOCK_D": BLOCK_D, "BLOCK_DV": BLOCK_DV, "num_warps": w, "num_stages": s}
            for r, w, s in entries]


def even_flags(D: int, Dv: int, cfg: dict) -> dict:
    """The EVEN_D / EVEN_DV constexprs (no feature / value-column masks needed) for a config."""
    return dict(EVEN_D=D == cfg["BLOCK_D"], EVEN_DV=Dv % cfg["BLOCK_DV"] == 0)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: few programs keep it fast


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunking(n_seq_len: int, parallel: int, device: torch.device, programs_per_sm: int):
    """(number of chunks, chunk length) splitting a sequence so that parallel x chunks programs
    fill the GPU (programs_per_sm per SM). GPU chunks are multiples of 128 rows (every block size
    divides them) and at least 512 rows; in the interpreter 32-row multiples, so that full blocks
    and tails, several chunks and the atomic reduction are all exercised by small tests."""
    n = max(int(n_seq_len), 1)
    if device.type == "cuda":
        align, target, min_chunk = 128, programs_per_sm * num_sms(device), 512
    else:
        align, target, min_chunk = 32, 8, 32
    n_chunks = max(1, min(_cdiv(target, max(parallel, 1)), _cdiv(n, min_chunk)))
    chunk = _cdiv(_cdiv(n, n_chunks), align) * align
    return _cdiv(n, chunk), chunk

