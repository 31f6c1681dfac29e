"""The package's one tuning cache: choices that an engine makes by timing candidates on a
problem's first call (the window engine's block sizes and engine, the launch configuration of an
autotuned kernel), kept for the process.

A key names everything that changes the choice: the caller passes the problem (shapes, dtypes,
device, geometry) and `choice` adds the settings of `dtk.config` that the timed code reads.
While a CUDA graph is being captured nothing can be timed: a problem not yet tuned takes its
default then, and is tuned on its first call outside capture. With `autotune` off every call takes
the default."""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Iterable, TypeVar

import torch

from . import _config

T = TypeVar("T")

_CACHE: Dict[Hashable, object] = {}


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choice(kind: str, problem: Hashable, device: torch.device, measure: Callable[[], T], default: Callable[[], T],
           settings: Iterable[str] = ()) -> T:
    """The cached choice of `kind` ("window.blocks", ...) for `problem`, measured by `measure()` on
    its first call on a GPU with autotuning on, and outside CUDA-graph capture; else `default()`.
    `settings` names the dtk.config settings the measured code depends on (part of the key)."""
    if device.type != "cuda" or not _config.get("autotune"):
        return default()
    key = (kind, problem, tuple((s, _config.get(s)) for s in settings))
    if key in _CACHE:
        return _CACHE[key]
    if capturing(device):
        return default()
    value = _CACHE[key] = measure()
    return value


def entries(kind: str) -> Dict[Hashable, object]:
    """The cached choices of one kind, {problem key: choice} (for tests and `dtk.info`)."""
    return {k[1:]: v for k, v in _CACHE.items() if k[0] == kind}


def clear() -> None:
    """Forgets every cached choice (the next call of each problem measures again)."""
    _CACHE.clear()


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """The median of `reps` CUDA-event timings of fn() on the current stream, in ms."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    events[-1][1].synchronize()
    return sorted(a.elapsed_time(b) for a, b in events)[reps // 2]
