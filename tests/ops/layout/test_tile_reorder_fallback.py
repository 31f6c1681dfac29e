"""The torch kernel of dtk::tile_reorder that serves CUDA tensors in builds without the CUDA C++
sources (a CPU-only wheel on a GPU machine): same results and argument errors as the C++ kernel.
It is device-agnostic, so it is checked here on CPU tensors against the CPU kernel."""
import math

import pytest
import torch

import dtk
from dtk import _C
from dtk.ops.layout import tile_reorder_torch

from .test_tile_reorder import BAD, CASES, check_bad_inputs

OP = torch.ops.dtk.tile_reorder


@pytest.mark.parametrize("grid,tile", CASES, ids=str)
@pytest.mark.parametrize("P", [0, 3])
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_cpu_kernel(grid, tile, P, inverse):
    x = torch.randn(2, P + math.prod(grid), 3, 2)
    y = tile_reorder_torch(x, list(grid), list(tile), P, inverse)
    assert y.is_contiguous() and torch.equal(y, OP(x, list(grid), list(tile), P, inverse))


def test_strided_and_dtypes():
    base = torch.randn(38, 3, 8)
    for x in (base.transpose(0, 1), (base * 10).to(torch.int8).transpose(0, 1), base[..., ::2].transpose(0, 1)):
        assert torch.equal(tile_reorder_torch(x, [5, 7], [2, 3], 3, False), OP(x, [5, 7], [2, 3], 3, False))


@pytest.mark.parametrize("changes,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_inputs(changes, name):
    check_bad_inputs(tile_reorder_torch, changes, name)


def test_cuda_kernel_registered_either_way():
    # C++ CUDA kernel when compiled, else this fallback: CUDA tensors always have a kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dtk::tile_reorder", "CUDA")
    assert dtk.info(quiet=True)["ops"]["tile_reorder"]["cuda"] == ("CUDA C++" if _C.with_cuda else "torch (fallback)")
