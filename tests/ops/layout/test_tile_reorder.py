"""dtk::tile_reorder (CPU) against layout.tile_permutation, and its Python wrappers."""
import math

import pytest
import torch

import dtk  # noqa: F401
from dtk.ops.layout import from_tile_order, to_tile_order
from dtk.ops.layout import tile_permutation

OP = torch.ops.dtk.tile_reorder

CASES = [
    ((13,), (4,)),
    ((16,), (16,)),
    ((5, 7), (2, 3)),          # partial tiles on both axes
    ((8, 8), (4, 4)),
    ((6, 5), (10, 1)),         # tile larger than the grid (clipped)
    ((3, 5, 4), (2, 2, 3)),
    ((4, 6, 10), (1, 4, 4)),
    ((1, 1, 1), (1, 1, 1)),
]


def expected(x, grid, tile, P):
    perm, _ = tile_permutation(grid, tile)
    return torch.cat([x[:, :P], x[:, P:][:, perm]], 1)


@pytest.mark.parametrize("grid,tile", CASES, ids=str)
@pytest.mark.parametrize("P", [0, 1, 5])
def test_matches_permutation_and_round_trips(grid, tile, P):
    S = P + math.prod(grid)
    x = torch.randn(2, S, 3, 4)
    y = OP(x, list(grid), list(tile), P, False)
    assert y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y, expected(x, grid, tile, P))
    assert torch.equal(y[:, :P], x[:, :P])                           # prefix untouched
    assert torch.equal(OP(y, list(grid), list(tile), P, True), x)    # inverse round trip
    _, inv = tile_permutation(grid, tile)
    assert torch.equal(OP(x, list(grid), list(tile), P, True)[:, P:], x[:, P:][:, inv])
    assert torch.equal(to_tile_order(x, grid, tile, num_prefix=P), y)
    assert torch.equal(from_tile_order(y, grid, tile, num_prefix=P), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.bool, torch.complex64])
@pytest.mark.parametrize("trailing", [(), (1,), (5,), (2, 3, 7)])
def test_dtypes_and_trailing_shapes(dtype, trailing):
    grid, tile, P = (5, 6), (2, 4), 2
    S = P + 30
    x = (torch.randn(2, S, *trailing) * 10).to(dtype)
    y = to_tile_order(x, grid, tile, num_prefix=P)
    assert y.dtype == dtype and torch.equal(y, expected(x, grid, tile, P))
    assert torch.equal(from_tile_order(y, grid, tile, num_prefix=P), x)


def test_strided_inputs():
    grid, tile, P = (3, 5, 4), (2, 2, 3), 1
    S = P + 60
    base = torch.randn(S, 3, 2, 8)
    for x in (base.transpose(0, 1), base.permute(1, 0, 3, 2), base[..., ::2].transpose(0, 1),
              torch.randn(1, S, 4).expand(3, S, 4)):
        assert torch.equal(to_tile_order(x, grid, tile, num_prefix=P), expected(x, grid, tile, P))


def test_int_grid_and_tile():
    x = torch.randn(1, 10, 2)
    assert torch.equal(to_tile_order(x, 10, 3), expected(x, (10,), (3,), 0))
    x = torch.randn(1, 36, 2)
    assert torch.equal(to_tile_order(x, (6, 6), 4), expected(x, (6, 6), (4, 4), 0))


BAD = [
    (dict(x=torch.randn(12)), "x"),
    (dict(grid=[]), "grid"),
    (dict(grid=[1, 1, 3, 4], tile=[1, 1, 2, 2]), "grid"),
    (dict(grid=[0, 4]), "grid"),
    (dict(grid=[3, 5]), "grid"),
    (dict(tile=[2]), "tile"),
    (dict(tile=[2, 0]), "tile"),
    (dict(num_prefix=-1), "num_prefix"),
    (dict(num_prefix=1), "grid"),
]


def check_bad_inputs(op, changes, name):
    """op (the C++ op or its torch fallback) rejects the bad argument with an error naming it."""
    a = dict(x=torch.randn(2, 12, 3), grid=[3, 4], tile=[2, 2], num_prefix=0)
    a.update(changes)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as e:
        op(a["x"], a["grid"], a["tile"], a["num_prefix"], False)
    assert name in str(e.value), str(e.value)


@pytest.mark.parametrize("changes,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_inputs(changes, name):
    check_bad_inputs(OP, changes, name)


@pytest.mark.parametrize("inverse", [False, True])
def test_opcheck(inverse):
    x = torch.randn(2, 3 + 35, 4)
    torch.library.opcheck(OP, (x, [5, 7], [2, 3], 3, inverse))
    torch.library.opcheck(OP, (torch.randn(1, 24, 2, 3).transpose(2, 3), [2, 3, 4], [1, 2, 3], 0, inverse))


def test_compile_fake():
    f = torch.compile(lambda t: from_tile_order(to_tile_order(t, (5, 7), (2, 3), num_prefix=3) * 2, (5, 7), (2, 3),
                                                num_prefix=3), backend="eager", fullgraph=True)
    x = torch.randn(2, 38, 4)
    assert torch.equal(f(x), x * 2)
