"""What every family's engine.py uses to say whether an engine can serve a call, in the manner of
NATTEN's `can_run_<backend>(..., raise_error)`: each engine states its reason, and a caller that
pinned it gets that reason as the error (docs/architecture.md, "Engines and configuration")."""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch


def triton_reason(t: torch.Tensor) -> Optional[str]:
    """Why a Triton kernel cannot run on t's device, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if t.device.type != "cuda":
        return f"the Triton kernel runs on CUDA tensors, got {t.device}"
    return None


def verdict(op: str, why: Optional[str], raise_error: bool) -> bool:
    """True when there is no reason against the engine; else False, or with raise_error a
    RuntimeError naming the op and the reason."""
    if why and raise_error:
        raise RuntimeError(f"dtk.{op}: {why}")
    return why is None


def verdict_of_check(check: Callable[[], None], raise_error: bool) -> bool:
    """Whether check() passes; its TypeError / ValueError (which names the argument) is the reason,
    raised with raise_error."""
    try:
        check()
    except (TypeError, ValueError):
        if raise_error:
            raise
        return False
    return True
