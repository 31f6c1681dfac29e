"""The analytic block-sparse plan against the dense mask: every allowed pair is covered exactly
once per query block, full entries need no mask, no entry is useless, geometry is exact."""
import math
import random

import pytest
import torch

from dtk.ops.window.plan import build_plan
from dtk.ops.window.reference import window_mask
from dtk.ops.window.spec import grid_coords, make_spec

from .cases import random_case


def check_plan(spec, block_q, block_k=None):
    block_k = block_k or block_q
    plan = build_plan(spec, block_q, block_k, torch.device("cpu"))
    P = spec.num_prefix
    mask = window_mask(spec)[P:, P:]
    coords = grid_coords(spec)
    covered = torch.zeros_like(mask)
    seen = torch.zeros(spec.num_grid, dtype=torch.int64)

    def rows_of(start, orig, ext, block):
        n = ext[0] * ext[1] * ext[2]
        assert 1 <= n <= block
        rows = torch.arange(start - P, start - P + n)
        for a in range(3):  # the block is the box it claims to be
            assert coords[a][rows].min() == orig[a] and coords[a][rows].max() == orig[a] + ext[a] - 1
        return rows

    for i in range(plan.num_blocks):
        d = plan.q_blocks[i].tolist()
        rows = rows_of(d[0], d[1:4], d[4:7], block_q)
        seen[rows] += 1
        c = plan.kv_count[i].tolist()
        assert c == sorted(c)
        for j in range(c[4]):
            e = plan.entries[i, j].tolist()
            assert e[7] == (j < c[2]), "full entries must come first"
            cols = rows_of(e[0], e[1:4], e[4:7], block_k)
            assert (len(cols) == block_k) == (j < c[0]) or j >= c[2], "full entries: block_k long ones first"
            of_key_shape = tuple(e[4:7]) == plan.key_shape
            if c[0] <= j < c[2]:   # full but short: those of the plan's key shape first
                assert of_key_shape == (j < c[1]), (j, e, plan.key_shape)
            if j >= c[2]:          # partial: likewise
                assert of_key_shape == (j < c[3]), (j, e, plan.key_shape)
            sub = mask[rows][:, cols]
            assert sub.any(), "entry with no allowed pair"
            if e[7]:
                assert sub.all(), "entry flagged full is not full"
            assert not covered[rows[:, None], cols[None, :]].any(), "key block listed twice"
            covered[rows[:, None], cols[None, :]] = True
    assert (seen == 1).all(), "query blocks must partition the grid"
    assert not (mask & ~covered).any(), "allowed pairs missing from the plan"
    assert sorted(plan.order.tolist()) == list(range(plan.num_blocks))


@pytest.mark.parametrize("seed", range(6))
def test_plan_random(seed):
    rng = random.Random(seed * 7919 + torch.randint(0, 10**6, ()).item())
    for _ in range(12):
        c = random_case(rng, max_side=13, max_tokens=300)
        spec = make_spec(c["grid"], c["window"], c["radius"], c["border"], c["num_prefix"], c["tile"])
        check_plan(spec, rng.choice([8, 16, 32]), rng.choice([None, 8, 16]))


@pytest.mark.parametrize("grid,window,radius,border,tile", [
    ((24, 40), (7, 9), None, "inward", (8, 16)),     # tile order, partial edge tiles
    ((24, 40), None, 6, "clip", None),               # row-major rows longer than a block
    ((5, 12, 20), (-1, 5, 7), None, "inward", None), # FreeSwim-like, whole time axis
    ((5, 12, 20), (-1, 5, 7), None, "inward", (1, 4, 8)),
    ((300,), (31,), None, "clip", None),
])
def test_plan_shapes(grid, window, radius, border, tile):
    check_plan(make_spec(grid, window, radius, border, 2, tile), 32)
    check_plan(make_spec(grid, window, radius, border, 2, tile), 32, 16)


def test_plan_is_cached_and_grid_change_needs_no_recompile():
    a = make_spec((12, 12), 5)
    cpu = torch.device("cpu")
    assert build_plan(a, 16, 16, cpu) is build_plan(make_spec((12, 12), 5), 16, 16, cpu)


def test_engine_pairs_counts_the_work_of_whole_blocks():
    """A window covering the grid: every block full, no waste beyond padding; the plan
    efficiency of a real window is below 1 and equals the brute-force count."""
    import torch

    from dtk.ops.window.plan import build_plan, engine_pairs
    from dtk.ops.window.spec import make_spec, pair_count

    dense = make_spec((8, 16), window=(8, 16), tile=(4, 8))            # 128 tokens, blocks of 32
    plan = build_plan(dense, 32, 32, torch.device("cpu"))
    assert engine_pairs(plan, dense) == pair_count(dense) == 128 * 128
    spec = make_spec((9, 10), window=(3, 5), num_prefix=5, tile=(4, 4))
    plan = build_plan(spec, 16, 16, torch.device("cpu"))
    n = plan.kv_count[:, 4].long().sum().item()
    brute = 16 * (n * 16 + plan.num_blocks * 16) + 1 * 16 * 96       # 95 tokens: keys padded to 96
    assert engine_pairs(plan, spec) == brute and pair_count(spec) < brute


def plan_efficiency(spec, blocks):
    from dtk.ops.window.plan import engine_pairs
    from dtk.ops.window.spec import pair_count
    return pair_count(spec) / engine_pairs(build_plan(spec, *blocks, torch.device("cpu")), spec)


def test_block_fill_and_key_block_choice():
    """128-key blocks where the layout tiles fill them clearly better than 64-key blocks (a
    (21, 3, 2) tile is one 126-token block, or three 42-token ones) or box windows' tiles hold
    whole 128-key blocks, else 64 (finer edges)."""
    from dtk.ops.window.plan import block_fill
    from dtk.ops.window.engine import default_blocks
    cuda = torch.device("cuda")   # only the block rule, nothing runs on it
    swim = make_spec((21, 68, 120), (-1, 31, 53), tile=(21, 3, 2))
    # 22 x 60 full layout tiles (126 tokens: three 42-token 64-blocks) + 60 edge tiles of 2 rows
    # (84 tokens: two 64-blocks); one 128-block each
    assert block_fill(swim, 64) == pytest.approx(21 * 68 * 120 / (64 * (3 * 22 * 60 + 2 * 60)))
    assert block_fill(swim, 128) == pytest.approx(21 * 68 * 120 / (128 * 23 * 60))
    assert default_blocks(cuda, 128, swim) == (128, 128)
    assert default_blocks(cuda, 256, swim) == (128, 64)       # 128-key blocks at d = 256 exceed shared memory
    # box windows in tiles of whole 128-key blocks: the same plan at either key block, 128 is faster
    na2d = make_spec((256, 256), (64, 64), tile=(8, 16))
    assert default_blocks(cuda, 128, na2d) == (128, 128)
    assert plan_efficiency(na2d, (128, 128)) == pytest.approx(plan_efficiency(na2d, (128, 64)))
    assert default_blocks(cuda, 128, make_spec((256, 256), (64, 64))) == (128, 64)            # row-major
    assert default_blocks(cuda, 128, make_spec((256, 256), radius=16, border="clip", tile=(8, 16))) == (128, 64)
    assert default_blocks(cuda, 128) == (128, 64)
    assert default_blocks(torch.device("cpu"), 128, swim) == (16, 16)
    assert plan_efficiency(swim, (128, 128)) > plan_efficiency(swim, (128, 64)) + 0.2


@pytest.mark.parametrize("grid, window, radius, others", [
    ((21, 68, 120), (-1, 31, 53), None, [None, (7, 2, 8), (1, 8, 16), (21, 2, 3), (3, 4, 8)]),   # FreeSwim 1080p
    ((21, 45, 80), (-1, 31, 53), None, [None, (7, 2, 8), (1, 8, 16)]),                            # Wan 720p
    ((128, 128), (64, 64), None, [None, (4, 32), (32, 4), (8, 8)]),
    ((96, 96), None, 16, [None, (4, 32), (8, 8), (2, 64)]),                                       # CLEAR
])
def test_suggest_tile_beats_the_alternatives(grid, window, radius, others):
    """The host-only estimate picks a tile whose exact plan efficiency (default GPU blocks) is at
    least that of row-major and of other plausible tiles."""
    from dtk.ops.layout import suggest_tile
    from dtk.ops.window.engine import default_blocks
    tile = suggest_tile(grid, window, radius=radius)
    assert tile is not None and all(1 <= u <= n for u, n in zip(tile, grid)) and len(tile) == len(grid)

    def eff(t):
        spec = make_spec(grid, window, radius, "inward" if window else "clip", 0, t)
        return plan_efficiency(spec, default_blocks(torch.device("cuda"), 128, spec))
    best = eff(tile)
    for t in others:
        assert best >= eff(t) - 1e-9, (tile, best, t, eff(t))
    if grid == (21, 68, 120):
        assert tile == (21, 3, 2) and best > 0.85


def test_suggest_tile_arguments():
    from dtk.ops.layout import suggest_tile
    assert suggest_tile([21, 68, 120], [-1, 31, 53]) == suggest_tile((21, 68, 120), (-1, 31, 53))
    with pytest.raises(ValueError, match="grid"):
        suggest_tile((0, 4), (3, 3))
    with pytest.raises(ValueError, match="radius|window"):
        suggest_tile((8, 8))
    with pytest.raises(ValueError, match="block"):
        suggest_tile((8, 8), (3, 3), block=0)


@pytest.mark.parametrize("seed", range(3))
def test_suggested_tiles_give_valid_plans(seed):
    """suggest_tile on random geometries (small blocks, so small grids get real tiles): a tile of
    the grid's rank within it, or None; the plan over that layout is exact."""
    from dtk.ops.layout import suggest_tile
    rng = random.Random(seed * 31337 + torch.randint(0, 10**6, ()).item())
    for _ in range(8):
        c = random_case(rng, max_side=13, max_tokens=300)
        block = rng.choice([16, 32])
        tile = suggest_tile(c["grid"], c["window"], radius=c["radius"], block=block)
        if tile is not None:
            assert len(tile) == len(c["grid"]) and all(1 <= u <= n for u, n in zip(tile, c["grid"]))
            assert block // 2 < math.prod(tile) <= block
        check_plan(make_spec(c["grid"], c["window"], c["radius"], c["border"], c["num_prefix"], tile), block)


def test_block_candidates_and_cpu_choice():
    """The block sizes the GPU block autotuning times: the rule's first, no duplicates, no 128-key
    blocks above D = 128; off the GPU the rule's choice without timing anything."""
    from dtk.ops.window.engine import block_candidates, choose_blocks, default_blocks
    swim = make_spec((21, 68, 120), (-1, 31, 53), tile=(21, 3, 2))
    clear = make_spec((64, 64), radius=16, border="clip", num_prefix=8, tile=(8, 16))
    assert block_candidates(128, swim) == [(128, 128), (128, 64), (64, 64)]
    assert block_candidates(128, clear) == [(128, 64), (128, 128), (64, 64)]
    assert block_candidates(256, clear) == [(128, 64), (64, 64)]
    q = torch.zeros(1, clear.seq_len, 2, 64)
    assert choose_blocks(q, q, q, clear, 0.125) == default_blocks(q.device, 64, clear) == (16, 16)
