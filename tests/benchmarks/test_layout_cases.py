"""The layout family (tile_reorder): rows are checked bit-for-bit before they are timed."""
import torch

from benchmarks import cli, registry
from benchmarks.cases import layout as L


def _runner():
    return cli.Runner("cpu", {"tflops": 0.1, "name": "test"}, cpu_target_s=0.01)


def test_cpu_cases_run_checked():
    cases = registry.select(False, ["layout"])
    assert {c.shape for c in cases} == {s.name for s in L.CPU_SHAPES}
    for c in cases:
        by = {r["impl"]: r for r in _runner().run_case(c, torch.float32)}
        assert by["dtk"]["status"] == "ok" and by["dtk"]["check"]["ok"], by["dtk"]
        assert by["torch-gather"]["status"] == "ok" and by["torch-gather"]["check"]["ok"]
        assert by["dtk"]["gbs"] > 0 and by["copy"]["status"] == "ok"


def test_wrong_permutation_fails(monkeypatch):
    import dtk
    monkeypatch.setattr(dtk, "to_tile_order", lambda x, *a, **kw: x.clone())   # row-major left as is
    c = registry.select(False, ["layout"])[0]
    d = _runner().run_case(c, torch.float32)[0]
    assert d["impl"] == "dtk" and d["status"] == "FAILED"


def test_gpu_set_registered():
    names = {c.shape for c in registry.select(True, ["layout"])}
    assert names == {s.name for s in L.GPU_SHAPES}
