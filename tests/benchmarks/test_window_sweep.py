"""The window sweep tool (benchmarks/window_sweep.py) is GPU-only; here: its shapes exist and the
dense control really is dense (every plan entry a full block, so no mask is ever evaluated)."""
from benchmarks import window_sweep
from dtk.ops.window.plan import build_plan


def test_sweep_shapes():
    names = [s.name for s in window_sweep.SHAPES]
    assert names[0].startswith("dense-control") and len(names) == 7, names
    assert "flux4096-r16-clip-p512-tile8x16" in names   # the e2e target's layer


def test_dense_control_plan_has_only_full_blocks():
    spec = window_sweep.SHAPES[0].spec()
    plan = build_plan(spec, 128, 64, "cpu")
    c = plan.kv_count
    assert (c[:, 0] == c[:, 4]).all() and (c[:, 0] == spec.num_grid // 64).all()


def test_unknown_shape_is_an_error_naming_it(capsys):
    import pytest

    with pytest.raises(SystemExit):
        window_sweep.main(["--shape", "no-such-shape*"])
    assert "no-such-shape*" in capsys.readouterr().err


def test_sweep_runs_every_variant_checked(monkeypatch):
    """The sweep on CPU tensors (Triton interpreter; the timer replaced): every block shape and
    launch configuration runs and matches the default variant."""
    import torch

    from benchmarks import sweep_cli
    from benchmarks.cases.window import WindowShape
    monkeypatch.setattr(sweep_cli, "bench", lambda fn: 1.0)
    rows = []
    window_sweep.sweep(WindowShape("tiny", 1, 2, 16, (8, 12), window=(3, 5)), rows, device="cpu", dtype=torch.float32)
    timed = [r for r in rows if "ms" in r]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert len([r for r in rows if "plan_eff" in r]) == len(window_sweep.BLOCKS)
    assert len(timed) > len(window_sweep.BLOCKS) and all(r["max_diff_vs_default"] < 1e-4 for r in timed)
    assert any(r["variant"] == "default, window_mask_by_dot=0" for r in timed)   # a box: both mask paths timed
    assert len([r for r in timed if r["variant"].startswith("single-loop engine")]) == 3   # at 2, 3, 4 stages
    from dtk import _config
    assert _config.get("window_mask_by_dot") is True, "the sweep must restore the default"
    assert _config.get("window_engine") == "auto", "the sweep must restore it"


def test_sweep_times_the_prefix_both_ways(monkeypatch):
    """With a prefix the sweep also times the prefix rows in the Triton kernel
    (window_prefix_by_dense=0), same output, and restores the default."""
    import torch

    from benchmarks import sweep_cli
    from benchmarks.cases.window import WindowShape
    from dtk import _config
    monkeypatch.setattr(sweep_cli, "bench", lambda fn: 1.0)
    monkeypatch.setattr(window_sweep, "BLOCKS", [(16, 16)])
    rows = []
    window_sweep.sweep(WindowShape("tiny-prefix", 1, 2, 16, (6, 8), radius=2, border="clip", num_prefix=5), rows,
                       device="cpu", dtype=torch.float32)
    (row,) = [r for r in rows if r["variant"] == "default, window_prefix_by_dense=0"]
    assert row["max_diff_vs_default"] < 1e-4 and _config.get("window_prefix_by_dense") is True


def test_dense_control_adds_the_triton_ceiling_row(monkeypatch):
    """A window covering the grid adds FlexAttention without a mask (here replaced by torch's
    SDPA, as no compiler runs on the CPU in tests): same output as the engine, in BSHD."""
    import torch
    import torch.nn.functional as F

    from benchmarks import sweep_cli
    from benchmarks.cases import window as cw
    from benchmarks.cases.window import WindowShape
    monkeypatch.setattr(sweep_cli, "bench", lambda fn: 1.0)
    monkeypatch.setattr(cw, "_flex_fn", lambda: F.scaled_dot_product_attention)
    monkeypatch.setattr(window_sweep, "BLOCKS", [(16, 16)])
    rows = []
    window_sweep.sweep(WindowShape("tiny-dense", 1, 2, 16, (4, 8), window=(4, 8)), rows, device="cpu",
                       dtype=torch.float32)
    (row,) = [r for r in rows if r["variant"] == "flex (dense, Triton)"]
    assert row["max_diff_vs_default"] < 1e-4
