"""CUDA tile_reorder kernel (CUTLASS FastDivmod, vectorised rows) against the CPU kernel and the
spec permutation, including strided and misaligned inputs."""
import math

import pytest
import torch

from dtk.ops.layout import tile_permutation

pytestmark = pytest.mark.gpu
OP = torch.ops.dtk.tile_reorder
CASES = [((13,), (4,)), ((5, 7), (2, 3)), ((3, 5, 4), (2, 2, 3)), ((21, 30, 52), (1, 8, 16)), ((64, 64), (8, 16)),
         ((1, 1, 1), (1, 1, 1)), ((6, 5), (10, 1))]


@pytest.mark.parametrize("grid,tile", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float64, torch.bool])
def test_cuda_matches_cpu_and_spec(grid, tile, dtype):
    for P in (0, 3):
        for trailing in ((), (1,), (3,), (12, 128), (7, 5)):
            S = P + math.prod(grid)
            if S * math.prod(trailing) > 5e6:
                continue
            x = (torch.randn(2, S, *trailing, device="cuda") * 10).to(dtype)
            perm, _ = tile_permutation(grid, tile, device="cuda")
            expected = torch.cat([x[:, :P], x[:, P:][:, perm]], 1)
            y = OP(x, list(grid), list(tile), P, False)
            assert torch.equal(y, expected)
            assert torch.equal(y.cpu(), OP(x.cpu(), list(grid), list(tile), P, False))
            assert torch.equal(OP(y, list(grid), list(tile), P, True), x)


def test_cuda_strided_and_misaligned():
    a = torch.randn(63, 3, 2, 8, device="cuda").transpose(0, 1)                      # strided batch/seq
    b = torch.randn(3, 63 * 7 + 1, device="cuda", dtype=torch.half)[:, 1:].view(3, 63, 7)  # misaligned rows
    for x in (a, b):
        y = OP(x, [7, 9], [2, 4], 0, False)
        assert torch.equal(y.cpu(), OP(x.cpu(), [7, 9], [2, 4], 0, False))
