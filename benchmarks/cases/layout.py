"""Token layout (`dtk.to_tile_order`, op `dtk::tile_reorder`): the permutation adapters run once
per model forward (hidden states into tile order). Memory-bound: read the GB/s and `% copy`
columns (the op reads and writes every element once).

Implementations, on the same tensor:
  dtk          the op (CPU: C++ kernel; CUDA: the CUDA C++ kernel, or the torch fallback in a
               build without the CUDA sources); checked first (bit-for-bit).
  torch-gather the same permutation as the fallback does it: a cached index and index_select on
               the grid tokens, cat with the prefix; checked.
  copy         x.clone(): a plain copy of the same bytes, the floor a permutation can reach.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import torch

from ..registry import Case, CheckResult, Impl, Prepared, Skip, first_call, register

OP = "layout"


@dataclass(frozen=True)
class LayoutShape:
    name: str
    B: int
    grid: Tuple[int, ...]
    tile: Tuple[int, ...]
    C: int
    num_prefix: int = 0
    note: str = ""

    @property
    def S(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return self.num_prefix + n


CPU_SHAPES = [
    LayoutShape("flux-64x64-tile8x16-C512", 1, (64, 64), (8, 16), 512, num_prefix=64),
    LayoutShape("wan-5x16x24-tile1x8x8-C256", 1, (5, 16, 24), (1, 8, 8), 256),
]
GPU_SHAPES = [
    LayoutShape("flux4k-256x256-tile8x16-C3072", 1, (256, 256), (8, 16), 3072, num_prefix=512,
                note="FLUX 4096^2 hidden states (text first)"),
    LayoutShape("wan1080p-21x68x120-tile7x2x8-C1536", 1, (21, 68, 120), (7, 2, 8), 1536,
                note="Wan2.1-1.3B 1080p tokens"),
]


def _reference_index(sh: LayoutShape, device):
    from dtk.ops.layout import tile_permutation

    perm, _ = tile_permutation(sh.grid, sh.tile, device=device)
    return perm


def make_setup(sh: LayoutShape):
    def setup(device, dtype):
        x = torch.randn(sh.B, sh.S, sh.C, device=device, dtype=dtype)
        return dict(shape=sh, device=device, x=x, perm=_reference_index(sh, device))
    return setup


def check(state, out) -> CheckResult:
    sh: LayoutShape = state["shape"]
    x, P = state["x"], sh.num_prefix
    want = torch.cat([x[:, :P], x[:, P:].index_select(1, state["perm"])], 1)
    ok = tuple(out.shape) == tuple(want.shape) and torch.equal(out, want)
    return CheckResult(ok, 0.0 if ok else float("inf"), 0.0, sh.S, "x[:, P + perm] (bit-for-bit)")


def _prep_dtk(state):
    try:
        import dtk
    except Exception as e:  # pragma: no cover
        raise Skip(f"import dtk failed: {e!r}"[:200])
    sh: LayoutShape = state["shape"]
    x = state["x"]
    fn = lambda: dtk.to_tile_order(x, sh.grid, sh.tile, num_prefix=sh.num_prefix)  # noqa: E731
    info = first_call(fn, state["device"], "tile_reorder")
    if x.is_cuda:
        from dtk import _C
        info["backend"] = "CUDA C++" if getattr(_C, "with_cuda", 0) else "torch fallback"
    return Prepared(fn, info)


def _prep_gather(state):
    sh: LayoutShape = state["shape"]
    x, perm, P = state["x"], state["perm"], sh.num_prefix
    return Prepared(lambda: torch.cat([x[:, :P], x[:, P:].index_select(1, perm)], 1))


def _prep_copy(state):
    x = state["x"]
    return Prepared(lambda: x.clone())


def make_case(sh: LayoutShape, gpu: bool) -> Case:
    dtype = "bfloat16" if gpu else "float32"
    eb = 2 if gpu else 4
    params = {k: v for k, v in asdict(sh).items() if k not in ("name", "note")}
    params["seq_len"] = sh.S
    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True),
             Impl("torch-gather", _prep_gather, check=True, note="index_select on the grid tokens + cat"),
             Impl("copy", _prep_copy, note="x.clone(): the same bytes, no permutation")]
    return Case(op=OP, shape=sh.name, params=params, setup=make_setup(sh), impls=impls, check=check,
                work=lambda: (0.0, 2.0 * sh.B * sh.S * sh.C * eb), dtype=dtype, gpu=gpu, note=sh.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
