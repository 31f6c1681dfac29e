"""The sparse family's benchmark cases: every CPU implementation runs and passes its check."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import registry  # noqa: E402
from benchmarks.cases import sparse as SP  # noqa: E402


@pytest.mark.parametrize("case", registry.select(False, ["sparse"]), ids=lambda c: c.shape)
def test_cpu_case_checks(case):
    import torch
    state = case.setup("cpu", torch.float32)
    for impl in case.impls:
        prep = impl.prepare(state)
        res = case.check(state, prep.fn())
        assert res.ok, (impl.name, res)
    flops, nbytes = case.work()
    assert flops > 0 and nbytes > 0


def test_gpu_cases_registered():
    names = {c.shape for c in registry.select(True, ["sparse"])}
    assert {"spotedit-flux-kontext", "ominicontrol2-flux", "segment-omini-4608+2x4096"} <= names
    se = [s for s in SP.GPU_SHAPES if s.kind == "spotedit"][0]
    assert se.n_text + round(se.frac * se.lens[1]) == 1741 and sum(se.lens) == 8704
