"""The linear sweep tool (benchmarks/linear_sweep.py) is GPU-only; here: its shapes exist, forcing
one launch configuration is undone afterwards, and without a GPU it says so."""
from benchmarks import linear_sweep
from dtk.ops.linear import triton as lt


def test_sweep_shapes():
    assert [s.name for s in linear_sweep.SHAPES] == ["flux4k-S66048-H24-d128", "sd15-4096-256x256-d80"]


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
