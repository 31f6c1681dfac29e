import os

# Kernels allocate their outputs filled with NaN instead of uninitialised memory, so a row a
# kernel forgets to write fails the comparison (must be set before dtk is imported).
os.environ.setdefault("DTK_DEBUG_NAN_FILL", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter (must be set before they are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dtk  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs on every run; the seed is printed on failure to reproduce it.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


_FAILURES_LOG = os.environ.get("DTK_TEST_FAILURES")   # scripts/gpu_check.sh: failures as they happen


def pytest_configure(config):
    # under xdist only the controller writes the failures log (it sees every worker's reports)
    global _FAILURES_LOG
    if hasattr(config, "workerinput"):
        _FAILURES_LOG = None


def pytest_runtest_logreport(report):
    # a run cut by its timeout still names the tests that failed before it
    if _FAILURES_LOG and report.failed:
        with open(_FAILURES_LOG, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n\n")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    from dtk._debug import triton_interpreter_broken
    broken = os.environ.get("TRITON_INTERPRET") == "1" and triton_interpreter_broken()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if broken and item.module.__name__.rsplit(".", 1)[-1] in ("test_triton", "test_triton_interpret"):
            item.add_marker(pytest.mark.skip(reason=broken))
