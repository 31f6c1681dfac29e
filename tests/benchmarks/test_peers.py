"""The optional peer implementations: NATTEN on window cases, flash-linear-attention on LinFusion
cases. NATTEN runs on the CPU (eager Flex Attention), so its rows run and are checked here; fla is
GPU only, so its causal reference is tested, and every skip gives its reason."""
import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cli  # noqa: E402
from benchmarks.cases import linear as L  # noqa: E402
from benchmarks.cases import window as W  # noqa: E402


def _runner():
    return cli.Runner("cpu", {"tflops": 0.1, "name": "test"}, cpu_target_s=0.01)


def _row(shape_case, impl):
    return next(r for r in _runner().run_case(shape_case, torch.float32) if r["impl"] == impl)


def _natten():
    # CI installs natten (scripts/env.sh): a skip there would hide a broken install
    return importlib.import_module("natten") if os.environ.get("CI") else pytest.importorskip("natten")


# ---------------------------------------------------------------------------------------------
# NATTEN

NATTEN_SHAPES = [   # even and odd windows, tile order, a -1 axis, a size-1 axis, 1D, the whole grid
    W.WindowShape("t-na2d-even-tiled", 1, 2, 32, (6, 10), window=(4, 5), tile=(2, 4)),
    W.WindowShape("t-na3d-unit-axis", 2, 2, 32, (1, 6, 10), window=(-1, 3, 6), tile=(1, 4, 3)),
    W.WindowShape("t-na1d-even", 1, 2, 32, (37,), window=(8,)),
    W.WindowShape("t-na2d-whole-grid", 1, 1, 32, (5, 6), window=(5, -1)),
]


@pytest.mark.parametrize("shape", NATTEN_SHAPES, ids=lambda s: s.name)
def test_natten_row_runs_and_passes_the_check(shape):
    _natten()
    r = _row(W.make_case(shape, gpu=False), "natten")
    assert r["status"] == "ok" and r["check"]["ok"] and r["ms"] > 0, r
    assert r["check"]["rows"] == shape.spec().seq_len
    whole = shape.name.endswith("whole-grid")
    assert r["info"]["backend"] == ("attention (the window is the whole grid)" if whole else "flex-fna eager")


def test_natten_geometry():
    assert W.natten_geometry(NATTEN_SHAPES[1]) == ((6, 10), (3, 6))        # unit axis dropped
    swim = next(s for s in W.GPU_SHAPES if s.name == "freeswim-1080p-rowmajor")
    assert W.natten_geometry(swim) == ((21, 68, 120), (21, 31, 53))   # FreeSwim: -1 = the axis
    reasons = {"circle window": W.CPU_SHAPES[3], "prefix tokens": W.CPU_SHAPES[0],
               "border 'clip'": W.WindowShape("x", 1, 1, 8, (6, 6), window=3, border="clip"),
               "window 1 on an axis": W.WindowShape("x", 1, 1, 8, (6, 6), window=(1, 3))}
    for why, shape in reasons.items():
        with pytest.raises(W.Skip, match=why):
            W.natten_geometry(shape)
        assert _row(W.make_case(shape, gpu=False), "natten")["reason"].startswith(why)


def test_natten_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)      # import natten -> ImportError
    r = _row(W.make_case(NATTEN_SHAPES[0], gpu=False), "natten")
    assert r["status"] == "skipped" and r["reason"] == "natten not installed"


def test_natten_registered_after_the_cudnn_anchor():
    for gpu in (False, True):
        for shape in (W.GPU_SHAPES if gpu else W.CPU_SHAPES):
            names = [i.name for i in W.make_impls(shape, gpu)]
            assert names[names.index("sdpa-cudnn") + 1:][:2] == (["flex", "natten"] if gpu else ["natten", "sdpa-flash"])


# ---------------------------------------------------------------------------------------------
# flash-linear-attention

def _causal_loop(fq, fk, v, eps=L.FLA_EPS):
    """out_t = sum_{s<=t} (fq_t . fk_s) v_s / (sum_{s<=t} fq_t . fk_s + eps), one row at a time."""
    out = torch.empty(*fq.shape[:3], v.shape[-1], dtype=fq.dtype)
    for t in range(fq.shape[1]):
        w = torch.einsum("bhd,bshd->bsh", fq[:, t], fk[:, :t + 1])
        out[:, t] = torch.einsum("bsh,bshe->bhe", w, v[:, :t + 1]) / (w.sum(1) + eps)[..., None]
    return out


def test_causal_reference_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 8, dtype=torch.float64, generator=g) for _ in range(3))
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    want = _causal_loop(fq, fk, v)
    torch.testing.assert_close(L.causal_linear_attention(fq, fk, v), want)
    rows = torch.tensor([0, 5, 6, 20, 36])
    torch.testing.assert_close(L.causal_linear_attention(fq[:, rows], fk, v, rows), want[:, rows])


@pytest.mark.parametrize("S", [300, 5000], ids=["all-rows", "row-subset"])
def test_causal_check_accepts_the_causal_function_only(S):
    case = L.make_case(L.LinearShape("t", 1, S, 2, 8), gpu=False)
    state = case.setup("cpu", torch.float32)
    q, k, v = state["q"], state["k"], state["v"]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    causal = L.causal_linear_attention(fq.double(), fk.double(), v.double()).float()
    res = L.check_causal(state, causal)
    assert res.ok and "causal" in res.against, res
    assert not L.check_causal(state, L.linfusion_naive(q, k, v)).ok     # the op's (non-causal) output
    assert case.check(state, L.linfusion_naive(q, k, v)).ok             # and the op's own check is unchanged


def test_fla_skips_with_reasons(monkeypatch):
    case = L.make_case(L.CPU_SHAPES[0], gpu=False)
    assert [i.name for i in case.impls][:3] == ["dtk", "naive", "fla-causal"]
    fla = types.ModuleType("fla")
    fla.__spec__ = importlib.machinery.ModuleSpec("fla", None)
    monkeypatch.setitem(sys.modules, "fla", fla)           # importable: on the CPU it is GPU only
    assert _row(case, "fla-causal")["reason"] == "GPU only"
    monkeypatch.setitem(sys.modules, "fla", None)          # not importable
    r = _row(case, "fla-causal")
    assert r["status"] == "skipped" and r["reason"] == "fla not installed"
    assert "causal" in r["note"]
