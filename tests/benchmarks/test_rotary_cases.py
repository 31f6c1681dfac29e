"""The rotary family (rms_norm_rope): rows are checked against the float64 reference before they
are timed, and a wrong kernel fails its row."""
import pytest
import torch

from benchmarks import cli, registry
from benchmarks.cases import rotary as R


def _runner():
    return cli.Runner("cpu", {"tflops": 0.1, "name": "test"}, cpu_target_s=0.01)


def test_cpu_cases_run_checked():
    pytest.importorskip("diffusers")
    cases = registry.select(False, ["rotary"])
    assert {c.shape for c in cases} == {s.name for s in R.CPU_SHAPES}
    for c in cases:
        by = {r["impl"]: r for r in _runner().run_case(c, torch.float32)}
        for name in ("dtk", "diffusers"):
            assert by[name]["status"] == "ok" and by[name]["check"]["ok"], by[name]
        assert by["dtk"]["gbs"] > 0 and by["copy"]["status"] == "ok"
        assert by["torch-compile"]["status"] == "skipped"   # GPU only


def test_wrong_kernel_fails(monkeypatch):
    import dtk
    monkeypatch.setattr(dtk, "rms_norm_rope", lambda x, *a, **kw: x.contiguous())   # no norm, no rotation
    c = registry.select(False, ["rotary"])[0]
    d = _runner().run_case(c, torch.float32)[0]
    assert d["impl"] == "dtk" and d["status"] == "FAILED"


def test_gpu_set_registered():
    assert {c.shape for c in registry.select(True, ["rotary"])} == {s.name for s in R.GPU_SHAPES}
