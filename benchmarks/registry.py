"""The one registry of benchmark cases: (op, shape) -> implementations, reference check, work counts.

A *case* is one op on one shape. It knows how to build its input tensors on a device/dtype
(`setup`), which implementations to time (`impls`: dtk and the anchors it is compared with), how
to check an implementation's output for correctness (`check`), and how much work one call is
(`work() -> (flops, bytes)`, flops being the mask's FLOPs, i.e. the useful work, identical for every implementation so that
effective TFLOP/s and speedups compare like with like; `bytes`: the minimum traffic).

Adding an op family: write `benchmarks/cases/<family>.py` that builds `Case` objects and calls
`register(...)` at import time, one call per case, for the CPU set (`gpu=False`) and the GPU set
(`gpu=True`). `benchmarks.cases` imports every module in that folder, so nothing else changes.
See `benchmarks/cases/window.py` for the pattern and docs/benchmarks.md for the conventions.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


class Skip(Exception):
    """Raised by an implementation's `prepare` (or by `setup`) when it cannot run here; the
    message is shown in the row (e.g. 'GPU only', 'needs 200 GiB', 'cuDNN: unsupported shape')."""


@dataclass
class Prepared:
    """What `Impl.prepare` returns: `fn()` runs one call (the thing that is timed) and returns the
    output in the op's layout (for the correctness check); `info` holds one-off costs measured
    while preparing (e.g. FlexAttention's `mask_s`), shown beside the row, never in its time."""
    fn: Callable[[], Any]
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Impl:
    name: str
    prepare: Callable[[Dict[str, Any]], Prepared]   # state (from Case.setup) -> Prepared
    kind: str = "anchor"                  # "dtk" (the library) or "anchor" (what it is compared with)
    check: bool = False                   # check output against the reference before timing (always for dtk)
    checker: Optional[Callable[[Dict[str, Any], Any], "CheckResult"]] = None  # replaces Case.check (a peer
                                          # with its own token layout, or computing a different function)
    devices: Tuple[str, ...] = ("cpu", "cuda")
    cost_hint_s: float = 0.0              # rough one-off cost (mask building, compile): used by --budget-s
    slow: bool = False                    # one call may take ~1 s: time with few reps
    reuse_key: Optional[Callable[[Dict[str, Any]], tuple]] = None  # same key -> reuse an earlier timing
    note: str = ""


@dataclass
class CheckResult:
    ok: bool
    err: float
    tol: float
    rows: int            # query rows compared
    against: str         # what the output was compared with

    def as_dict(self):
        return dict(ok=self.ok, err=self.err, tol=self.tol, rows=self.rows, against=self.against)


@dataclass
class Case:
    op: str
    shape: str
    params: Dict[str, Any]                           # shown in JSON/RESULTS (grid, window, heads, ...)
    setup: Callable[[str, Any], Dict[str, Any]]      # (device, dtype) -> state (tensors, spec, ...)
    impls: List[Impl]
    check: Callable[[Dict[str, Any], Any], CheckResult]  # (state, output) -> CheckResult
    work: Callable[[], Tuple[float, float]]          # () -> (flops, bytes); lazy: exact counts can cost a second
    dtype: str                                       # "float32", "bfloat16", ...
    gpu: bool                                        # belongs to the --gpu set
    note: str = ""

    _work: Optional[Tuple[float, float]] = field(default=None, repr=False)

    def _get_work(self):
        if self._work is None:
            f, b = self.work()
            self._work = (float(f), float(b))
        return self._work

    @property
    def flops(self) -> float:
        return self._get_work()[0]

    @property
    def bytes(self) -> float:
        return self._get_work()[1]

    @property
    def key(self) -> str:
        return f"{self.op}/{self.shape}"


_CASES: List[Case] = []


def first_call(fn: Callable, device: str, op: str) -> Dict[str, float]:
    """Runs fn once (compiles / autotunes: reported as first_call_s, never timed). An op with no
    kernel for this device becomes a Skip, not an error."""
    t = time.perf_counter()
    try:
        fn()
    except NotImplementedError as e:
        if "Could not run" in str(e):
            raise Skip(f"dtk::{op} has no {device} kernel in this build")
        raise
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
    return {"first_call_s": round(time.perf_counter() - t, 2)}


def probe(fn: Callable, device: str, label: str) -> None:
    """Runs an anchor once before it is timed; an implementation that cannot run here (an SDPA
    backend without a kernel for this device / dtype / shape, ...) becomes a Skip naming why."""
    try:
        fn()
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if msg.startswith("No viable backend"):
            msg = "no kernel for this device/dtype/shape (SDPA: no viable backend)"
        raise Skip(f"{label}: {msg}"[:160])


def check_gradients(state, grads, reference: Callable, full: bool, against: str) -> CheckResult:
    """The correctness rule (docs/testing.md) per gradient, errors relative to the gradient's largest magnitude: error vs
    float64 <= 2 x (error of the reference evaluated in the run's dtype) + atol. `reference(state,
    dtype)` gives the reference gradients: all of them when `full`, else dq on state["rows"] only
    (a row's dq needs only its own keys), against which grads[0] is compared on those rows."""
    import torch
    rows = state["rows"]
    got = grads if full else (grads[0].index_select(1, rows),)
    against += " (errors relative to the max |grad|)"
    if any(torch.isnan(t).any() for t in got):
        return CheckResult(False, float("nan"), 0.0, rows.numel(), against + "; NaN in a gradient")
    if "_grad64" not in state:
        state["_grad64"] = reference(state, torch.float64)
        lowp = state["q"].dtype
        state["_grad_low"] = state["_grad64"] if lowp == torch.float64 else reference(state, lowp)
    atol = 1e-5 if state["q"].dtype in (torch.float32, torch.float64) else 2e-3
    ok, worst = True, (0.0, 1.0)
    for a, r64, rlow in zip(got, state["_grad64"], state["_grad_low"]):
        mag = max(r64.abs().max().item(), 1e-30)
        err = (a.double() - r64).abs().max().item() / mag
        tol = 2 * (rlow.double() - r64).abs().max().item() / mag + atol
        ok &= err <= tol
        if err / tol >= worst[0] / worst[1]:
            worst = (err, tol)
    return CheckResult(ok, worst[0], worst[1], rows.numel(), against)


def register(case: Case) -> Case:
    if any(c.key == case.key and c.gpu == case.gpu for c in _CASES):
        raise ValueError(f"duplicate benchmark case {case.key}")
    _CASES.append(case)
    return case


def all_cases() -> List[Case]:
    from . import cases  # noqa: F401  (imports every family module, which registers its cases)
    return list(_CASES)


def select(gpu: bool, ops: Optional[Sequence[str]] = None, shapes: Optional[Sequence[str]] = None) -> List[Case]:
    """Cases of the CPU (gpu=False) or GPU set, filtered by op names and shape globs; with `ops`
    given, in the order of `ops` (so a time-limited run does the most important family first)."""
    out = []
    for c in all_cases():
        if c.gpu != gpu:
            continue
        if ops and c.op not in ops:
            continue
        if shapes and not any(fnmatch.fnmatchcase(c.shape, s) or c.shape == s for s in shapes):
            continue
        out.append(c)
    if ops:
        out.sort(key=lambda c: list(ops).index(c.op))  # stable: registration order within a family
    return out


def ops() -> List[str]:
    return sorted({c.op for c in all_cases()})
