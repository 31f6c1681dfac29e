"""The linear sweep tool (benchmarks/linear_sweep.py) is GPU-only; here: its shapes exist, forcing
one launch configuration is undone afterwards, and without a GPU it says so."""
from benchmarks import linear_sweep
from dtk import _config
from dtk.ops.linear import launch as lt
from dtk.ops.memo import engine as me

SETTINGS = ("linear_state_ks_by_dot", "linear_apply_den_by_dot", "linear_programs_per_sm", "linear_state_atomic")


def test_sweep_shapes():
    assert [s.name for s in linear_sweep.SHAPES] == ["flux4k-S66048-H24-d128", "sd15-4096-256x256-d80",
                                                     "memo-32768x16-d40"]


def test_forced_config_is_restored():
    real = lt.launch_configs
    cfg = lt.launch_configs("state", 128, 128)[-1]
    with linear_sweep._forced("state", cfg):
        assert lt.launch_configs("state", 128, 128) == [cfg]
        assert lt.launch_configs("apply", 128, 128) == real("apply", 128, 128)
    assert lt.launch_configs is real


def test_needs_a_gpu(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert linear_sweep.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_sweep_runs_every_variant_checked(monkeypatch):
    """The sweep on CPU tensors (Triton interpreter; the timer replaced): every variant of both
    kernels runs and matches the default, and the settings are unchanged after the sweep."""
    import torch

    from benchmarks import sweep_cli
    from benchmarks.cases.linear import LinearShape
    monkeypatch.setattr(sweep_cli, "bench", lambda fn: 1.0)
    monkeypatch.setattr(sweep_cli, "kernel_times", lambda fn: (fn(), [("_grad_q_kernel", 0.5)])[1])
    rows = []
    before = tuple(_config.get(name) for name in SETTINGS)
    linear_sweep.sweep(LinearShape("tiny", 1, 200, 2, 16), rows, device="cpu", dtype=torch.float32)
    assert tuple(_config.get(name) for name in SETTINGS) == before
    split = [r for r in rows if "PROGRAMS_PER_SM" in r["variant"]]
    assert len(split) == 6 and all(r["max_diff_vs_default"] < 1e-4 for r in split)
    wide = [r for r in rows if r["variant"] == "backward wide kernels"]
    assert len(wide) == 1 and wide[0]["max_diff_vs_default"] < 1e-4
    assert [r["variant"] for r in rows if r["variant"].endswith(": _grad_q_kernel")] == [
        "backward whole tiles: _grad_q_kernel", "backward wide kernels: _grad_q_kernel"]   # per-kernel breakdown
    assert lt.backward_whole_tiles(16, 16)   # restored
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    for kernel, flag in (("state", "STATE_KS_BY_DOT"), ("apply", "APPLY_DEN_BY_DOT")):
        n = len(lt.launch_configs(kernel, 16, 16, torch.float32))
        for on in (0, 1):
            mine = [r for r in rows if r["variant"].startswith(f"{kernel} {flag}={on} ")]
            assert len(mine) == n and all(r["max_diff_vs_default"] < 1e-4 and r["gbs"] > 0 for r in mine)


def test_memo_sweep_runs_every_variant_checked(monkeypatch):
    import torch

    from benchmarks import sweep_cli
    from benchmarks.cases.linear import LinearShape
    monkeypatch.setattr(sweep_cli, "bench", lambda fn: 1.0)
    rows = []
    linear_sweep.sweep(LinearShape("memo-tiny", 5, 16, 2, 24, kind="memo"), rows, device="cpu", dtype=torch.float32)
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    variants = [r for r in rows if r["variant"].startswith("memory_step clips=")]
    assert len(variants) == len(me.MEMO_STEP_VARIANTS) and all(r["max_diff_vs_default"] == 0 for r in variants)
