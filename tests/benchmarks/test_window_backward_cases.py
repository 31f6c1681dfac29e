"""The window forward + backward benchmark cases: the sets, the FLOP count, and a check that
passes the op's gradients and fails perturbed ones (CPU, a few seconds)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import registry  # noqa: E402
from benchmarks.cases import window_backward as WB  # noqa: E402
from dtk.ops.window.spec import pair_count  # noqa: E402


def test_sets_and_flops():
    gpu = {c.shape: c for c in registry.select(True, ["window-bwd"])}
    assert {"flux1024-r16-clip-p512-tile8x16", "na2d-256-w64-tile8x16"} <= set(gpu)
    assert all(c.dtype == "bfloat16" and [i.name for i in c.impls] == ["dtk", "sdpa-cudnn", "sdpa-flash", "flex"]
               for c in gpu.values())
    cpu = registry.select(False, ["window-bwd"])
    assert cpu and all(c.dtype == "float32" for c in cpu)
    c = cpu[0]
    sh = next(s for s in WB.CPU_SET if s.name == c.shape)
    assert c.flops == 3.5 * 4.0 * sh.B * sh.H * sh.D * pair_count(sh.spec())


def test_check_passes_the_op_and_fails_a_wrong_gradient():
    c = registry.select(False, ["window-bwd"])[0]
    state = c.setup("cpu", torch.float32)
    grads = WB._prep_dtk(state).fn()
    assert c.check(state, grads).ok
    for i in range(3):
        bad = list(grads)
        bad[i] = bad[i] * 1.001
        assert not c.check(state, tuple(bad)).ok
    bad = list(grads)
    bad[0] = bad[0].clone()
    bad[0][0, -1, 0, 0] = float("nan")
    assert not c.check(state, tuple(bad)).ok


def test_check_on_rows_for_long_sequences(monkeypatch):
    """Past FULL_CHECK_UP_TO tokens only dq on the check rows is compared (dk, dv need every query)."""
    monkeypatch.setattr(WB, "FULL_CHECK_UP_TO", 16)
    c = registry.select(False, ["window-bwd"])[0]
    state = c.setup("cpu", torch.float32)
    grads = WB._prep_dtk(state).fn()
    res = c.check(state, grads)
    assert res.ok and "query rows" in res.against
    bad = (grads[0] * 1.001,) + tuple(grads[1:])
    assert not c.check(state, bad).ok
