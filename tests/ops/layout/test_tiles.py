"""layout.tiles: the one int-or-tuple normaliser, grid/tile checks, and the engine record."""
import pytest
import torch

import dtk
from dtk.ops.layout import as_tuple, block_fill, check_grid, check_tile, suggest_tile


def test_as_tuple():
    assert as_tuple("tile", 4, 3) == (4, 4, 4)
    assert as_tuple("tile", [2, 3], 2) == (2, 3)
    assert as_tuple("grid", 7, None) == (7,) and as_tuple("grid", (3, 4, 5), None) == (3, 4, 5)
    with pytest.raises(ValueError, match="tile"):
        as_tuple("tile", (2, 3), 3)
    with pytest.raises(TypeError, match="window"):
        as_tuple("window", True, 2)
    with pytest.raises(ValueError, match="tile"):
        as_tuple("tile", (2, 3.0), 2)


def test_grid_and_tile_checks():
    assert check_grid(5) == (5,) and check_tile(8, (5, 6)) == (5, 6)
    with pytest.raises(ValueError, match="grid"):
        check_grid((1, 2, 3, 4))
    with pytest.raises(ValueError, match="tile sizes"):
        check_tile((0, 2), (4, 4))
    assert block_fill((21, 68, 120), (21, 3, 2), 128) == pytest.approx(21 * 68 * 120 / (128 * 23 * 60))
    with pytest.raises(ValueError, match="window"):
        suggest_tile((8, 8), (0, 3))


def test_last_engine_on_cpu():
    dtk.to_tile_order(torch.randn(1, 12, 2), (3, 4), 2)
    assert dtk.last_engine("tile_reorder") == "cpp"
