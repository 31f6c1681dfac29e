"""The sparse forward + backward benchmark cases: sets, FLOPs, and a check that passes the op's
gradients and fails perturbed ones, on every gradient and on the rows-only path (CPU)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import registry  # noqa: E402
from benchmarks.cases import sparse as SP  # noqa: E402
from benchmarks.cases import sparse_backward as SB  # noqa: E402


def test_sets_and_flops():
    gpu = {c.shape: c for c in registry.select(True, ["sparse-bwd"])}
    assert set(gpu) == {"ominicontrol2-flux", "segment-omini-4608+2x4096"}
    cpu = registry.select(False, ["sparse-bwd"])
    assert {c.params["kind"] for c in cpu} == {"ominicontrol2", "segment"}
    for c in cpu:
        sh = next(s for s in SP.CPU_SHAPES if s.name == c.shape)
        assert c.flops == 3.5 * 4.0 * sh.B * sh.H * sh.D * SP._pairs(sh)


@pytest.mark.parametrize("full", [True, False])
def test_check_passes_the_op_and_fails_a_wrong_gradient(full, monkeypatch):
    if not full:
        monkeypatch.setattr(SB, "FULL_CHECK_UP_TO", 16)
    for c in registry.select(False, ["sparse-bwd"]):
        state = c.setup("cpu", torch.float32)
        grads = SB._prep_dtk(state).fn()
        res = c.check(state, grads)
        assert res.ok, (c.shape, res)
        assert ("every gradient" in res.against) == full
        for i in range(len(grads) if full else 1):
            bad = list(grads)
            bad[i] = bad[i] * 1.001
            assert not c.check(state, tuple(bad)).ok, (c.shape, i)
