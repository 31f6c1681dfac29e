"""dtk.info() / python -m dtk: the install report (versions, engines, per-op kernels)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtk
from dtk import _C
from dtk._info import arch_coverage, format_info

ROOT = Path(__file__).resolve().parents[2]


def test_info_facts():
    d = dtk.info(quiet=True)
    assert d["version"] == dtk.__version__ and d["torch"] == torch.__version__
    assert d["built_against_torch"] == _C.torch_version and not d["torch_mismatch"]
    assert {"window_attention", "tile_reorder", "linear_attention", "linear_attention_backward",
            "memory_linear_attention_update"} <= set(d["ops"])
    for op, k in d["ops"].items():
        assert k["cpu"] in ("C++", "C++ (any device)"), (op, k)
        assert k["cuda"], f"{op}: no CUDA kernel registered"     # Triton / CUDA C++ / torch fallback
    assert d["ops"]["window_attention"]["cuda"] == "Triton"
    assert d["ops"]["tile_reorder"]["cuda"] == ("CUDA C++" if _C.with_cuda else "torch (fallback)")
    e = d["engines"]
    assert e["reference"]["ok"] and e["cpp_cpu"]["ok"]
    assert e["cuda_cpp"]["ok"] == bool(_C.with_cuda)
    if not _C.with_cuda:
        assert _C.cuda_note and _C.cuda_note in e["cuda_cpp"]["detail"]
    else:
        assert _C.cuda_archs and _C.cuda_archs in e["cuda_cpp"]["detail"]
    if not torch.cuda.is_available():
        assert not d["gpu"]["ok"] and d["gpu"]["why"] and not e["triton"]["usable"]


def test_info_prints(capsys):
    d = dtk.info()
    out = capsys.readouterr().out
    assert out.strip() == format_info(d).strip()
    for s in (f"dtk {dtk.__version__}", f"torch {torch.__version__}", "C++ CPU kernels", "CUDA C++ kernels",
              "Triton GPU kernels", "GPU:", "window_attention", "tile_reorder"):
        assert s in out, s


def test_python_m_dtk():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "dtk"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"dtk {dtk.__version__}" in r.stdout and "engines:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dtk", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == dtk.__version__


@pytest.mark.parametrize("archs,cap,want", [
    ("80,90a", "9.0", "native sm_90a"),
    ("80,90a", "8.0", "native sm_80"),
    ("80,90a", "8.6", "PTX JIT from compute_80"),
    ("80,90a", "12.0", "PTX JIT from compute_80"),
    ("90a", "10.0", "not covered"),               # arch-specific PTX does not run on later archs
    ("80-real,90-real", "8.9", "not covered"),
    ("75;86-virtual", "8.9", "PTX JIT from compute_86"),
    ("80", "7.5", "not covered"),
])
def test_arch_coverage(archs, cap, want):
    assert arch_coverage(archs, cap) == want


def test_exports():
    import types
    for name in dtk.__all__:
        obj = getattr(dtk, name)
        assert callable(obj) or isinstance(obj, types.ModuleType), name
    assert {"info", "to_tile_order", "from_tile_order", "window_attention", "linear_attention"} <= set(dtk.__all__)
