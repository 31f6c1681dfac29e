"""The end-to-end benchmark cases (benchmarks/cases/e2e.py): tiny CPU rows run and check, and
without diffusers every row is skipped with a clear reason (the GPU machine has no diffusers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import registry  # noqa: E402
from benchmarks.cases import e2e  # noqa: E402


def test_cases_registered():
    assert {c.shape for c in registry.select(True, ["e2e"])} == {s.name for s in e2e.GPU_SHAPES}
    assert {c.shape for c in registry.select(False, ["e2e"])} == {s.name for s in e2e.CPU_SHAPES}
    # the issues' anchor is dense cuDNN: on a GPU the unadapted model also runs with SDPA held to it
    for c in registry.select(True, ["e2e"]):
        assert [i.name for i in c.impls][:2] == ["diffusers-dense", "diffusers-dense-cudnn"]
    for c in registry.select(False, ["e2e"]):
        assert "diffusers-dense-cudnn" not in [i.name for i in c.impls]


def test_cpu_wan_case_runs_and_checks():
    pytest.importorskip("diffusers")
    (case,) = [c for c in registry.select(False, ["e2e"]) if c.shape.startswith("wan")]
    state = case.setup("cpu", torch.float32)
    for impl in case.impls:
        prep = impl.prepare(state)
        res = case.check(state, prep.fn())
        assert res.ok, (impl.name, res)


def test_cpu_flux_case_runs_and_checks():
    """Every FLUX row runs and checks; the dense-with-dtk-glue anchor computes the unadapted
    model's function, and the rows after it get the model's own processors back."""
    pytest.importorskip("diffusers")
    (case,) = [c for c in registry.select(False, ["e2e"]) if c.shape.startswith("flux")]
    names = [i.name for i in case.impls]
    assert names[:3] == ["diffusers-dense", "dense-dtk-glue", "dtk-local"]
    state = case.setup("cpu", torch.float32)
    outs = {}
    for impl in case.impls:
        outs[impl.name] = impl.prepare(state).fn()
        assert case.check(state, outs[impl.name]).ok, impl.name
    torch.testing.assert_close(outs["dense-dtk-glue"], outs["diffusers-dense"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(case.impls[0].prepare(state).fn(), outs["diffusers-dense"], atol=0, rtol=0)


def test_skips_cleanly_without_diffusers(tmp_path):
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from benchmarks.cli import main\n"
            f"sys.exit(main(['--op', 'e2e', '--shape', 'wan-tiny-*', '--json', r'{tmp_path / 'b.json'}']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "diffusers not importable" in r["reason"] for r in rows)
