"""Mask semantics on small cases against hand counts and closed forms (reference engine)."""
import pytest
import torch
import torch.nn.functional as F

from dtk.ops.window.reference import window_attention_reference, window_mask
from dtk.ops.layout import tile_permutation
from dtk.ops.window.spec import make_spec, pair_count


@pytest.mark.parametrize("r,count", [(8, 193), (16, 793), (32, 3205)])
def test_circle_interior_counts(r, count):
    spec = make_spec((2 * r + 3, 2 * r + 5), radius=r, border="clip")
    m = window_mask(spec)
    assert m[(r + 1) * (2 * r + 5) + r + 2].sum() == count
    # inward circles keep the interior count everywhere (the window shifts inside)
    assert (window_mask(make_spec((2 * r + 3, 2 * r + 5), radius=r, border="inward")).sum(1) == count).all()


@pytest.mark.parametrize("grid,window", [((9,), (4,)), ((7, 10), (3, 4)), ((5, 6, 7), (-1, 3, 5))])
def test_inward_box_constant_size(grid, window):
    m = window_mask(make_spec(grid, window, border="inward"))
    n = 1
    for g, w in zip(grid, window):
        n *= g if w == -1 else min(w, g)
    assert (m.sum(1) == n).all()


def test_clip_box_edges_see_fewer():
    m = window_mask(make_spec((10,), 5, border="clip"))
    assert m.sum(1).tolist() == [3, 4, 5, 5, 5, 5, 5, 5, 4, 3]
    m = window_mask(make_spec((10,), 4, border="clip"))  # even: [p-2, p+1]
    assert m[0].nonzero().flatten().tolist() == [0, 1] and m[5].nonzero().flatten().tolist() == [3, 4, 5, 6]


def test_inward_box_rule():
    m = window_mask(make_spec((10,), 4, border="inward"))
    starts = [int(row.nonzero()[0]) for row in m]
    assert starts == [max(0, min(p - 2, 6)) for p in range(10)]


def test_prefix_and_extra_keys():
    spec = make_spec((4, 4), 1, num_prefix=3)
    m = window_mask(spec, num_extra=2)
    assert m[:3, :19].all() and not m[:3, 19:].any()        # prefix queries: all sequence keys, no extras
    assert m[3:, :3].all() and m[3:, 19:].all()             # grid queries: prefix and extra keys
    assert (m[3:, 3:19].sum(1) == 1).all()                   # window 1: only itself


@pytest.mark.parametrize("spec_args", [
    dict(grid=(7, 9), window=(3, 4), border="inward", num_prefix=2, tile=(2, 3)),
    dict(grid=(5, 6, 7), window=(-1, 3, 2), border="clip"),
    dict(grid=(13, 11), radius=4, border="clip", num_prefix=1),
    dict(grid=(4, 5, 6), radius=3, border="inward", tile=(2, 2, 4)),
])
def test_pair_count_matches_mask(spec_args):
    spec = make_spec(**spec_args)
    assert pair_count(spec, 3) == int(window_mask(spec, 3).sum())


def test_window_covering_grid_is_dense_sdpa():
    B, H, D, grid, P = 2, 3, 16, (5, 7), 4
    S = P + 35
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for kw in (dict(window=-1), dict(window=(9, 13), border="clip"), dict(radius=9, border="clip")):
        out, _ = window_attention_reference(q, k, v, grid, num_prefix=P, **kw)
        torch.testing.assert_close(out, ref)


def test_tile_permutation():
    perm, inv = tile_permutation((5, 7), (2, 3))
    assert sorted(perm.tolist()) == list(range(35))
    assert torch.equal(perm[inv], torch.arange(35)) and torch.equal(inv[perm], torch.arange(35))
    # first tile: rows 0-1, cols 0-2 in row-major order; the next tile continues on the right
    assert perm[:9].tolist() == [0, 1, 2, 7, 8, 9, 3, 4, 5]
    # the last tile column is partial (7 = 3 + 3 + 1)
    assert perm[12:14].tolist() == [6, 13]


def test_tile_order_is_a_relabelling():
    """The same attention in tile order equals the row-major result permuted."""
    grid, tile, P = (6, 7), (4, 3), 2
    perm, _ = tile_permutation(grid, tile)
    full = torch.cat([torch.arange(P), P + perm])
    q, k, v = (torch.randn(1, P + 42, 2, 8, dtype=torch.float64) for _ in range(3))
    for kw in (dict(window=(3, 5)), dict(radius=3, border="clip")):
        a, la = window_attention_reference(q, k, v, grid, num_prefix=P, **kw)
        b, lb = window_attention_reference(q[:, full], k[:, full], v[:, full], grid, num_prefix=P, tile=tile, **kw)
        torch.testing.assert_close(b, a[:, full])
        torch.testing.assert_close(lb, la[:, :, full])
