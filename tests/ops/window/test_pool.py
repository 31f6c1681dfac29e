"""pool_grid_tokens (CLEAR's pooled keys) against a per-patch loop: row-major and tile order,
crop of non-divisible axes, 1-3 axes, prefix tokens, gradients, bad input."""
import itertools

import pytest
import torch

from dtk.ops.window import pool_grid_tokens, tile_permutation


def loop_reference(x, grid, factor, weight, P, tile):
    g = x[:, P:]
    if tile is not None:
        g = g[:, tile_permutation(grid, tile)[1]]           # to row-major
    g = g.reshape((x.shape[0],) + tuple(grid) + tuple(x.shape[2:]))
    out_grid = [a // b for a, b in zip(grid, factor)]
    w = weight.reshape(-1)
    rows = []
    for p in itertools.product(*(range(o) for o in out_grid)):
        acc = 0
        for j, off in enumerate(itertools.product(*(range(b) for b in factor))):
            acc = acc + w[j] * g[(slice(None),) + tuple(pi * b + oi for pi, b, oi in zip(p, factor, off))]
        rows.append(acc)
    return torch.stack(rows, 1) if rows else g.new_zeros((x.shape[0], 0) + tuple(x.shape[2:]))


@pytest.mark.parametrize("grid, factor, tile, P", [
    ((8, 6), (2, 2), None, 0),
    ((7, 10), (2, 3), (3, 4), 2),          # crop + partial tiles
    ((5, 9), 2, (2, 4), 1),
    ((3, 4, 6), (1, 2, 3), (2, 2, 4), 3),
    ((13,), 4, 5, 0),
    ((1, 5), (2, 2), None, 0),             # an axis shorter than its factor: empty
])
def test_matches_the_patch_loop(grid, factor, tile, P):
    nd = len(grid)
    f = (factor,) * nd if isinstance(factor, int) else factor
    n = 1
    for v in f:
        n *= v
    S = P + int(torch.tensor(grid).prod())
    x = torch.randn(2, S, 3, 4, dtype=torch.float64)
    w = torch.rand(n, dtype=torch.float64)
    if tile is not None:
        x_t = x.clone()
        x_t[:, P:] = x[:, P:][:, tile_permutation(grid, tile)[0]]   # grid tokens stored in tile order
    else:
        x_t = x
    out = pool_grid_tokens(x_t, grid, factor, w, num_prefix=P, tile=tile)
    ref = loop_reference(x_t, grid, f, w, P, tile)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(pool_grid_tokens(x_t, grid, factor, None, num_prefix=P, tile=tile),
                               loop_reference(x_t, grid, f, torch.full((n,), 1.0 / n, dtype=torch.float64), P, tile),
                               atol=1e-12, rtol=0)


def test_gradients_in_x_and_weight():
    x = torch.randn(1, 2 + 24, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 1, 1, 2, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: pool_grid_tokens(x, (4, 6), 2, w, num_prefix=2, tile=(2, 4)), (x, w))


def test_bad_input():
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="factor"):
        pool_grid_tokens(x, (3, 4), 0)
    with pytest.raises(ValueError, match="factor"):
        pool_grid_tokens(x, (3, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="x must be"):
        pool_grid_tokens(x, (3, 5), 2)
    with pytest.raises(ValueError, match="weight"):
        pool_grid_tokens(x, (3, 4), 2, torch.ones(3))
