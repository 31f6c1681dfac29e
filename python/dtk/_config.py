"""dtk's configuration: which engine serves a call, the engines' variant switches and the debug
switches, in one typed, visible place (docs/architecture.md, "Engines and configuration").

Every setting has a default, which an environment variable may supply (read at call time), and a
scope may override it::

    with dtk.config(window_engine="triton", autotune=False):
        out = dtk.window_attention(q, k, v, (64, 64), 17)
    dtk.last_engine("window_attention")     # -> "triton"

The scope is a context variable: nested scopes stack, threads and asyncio tasks each see their
own. Nothing here is a module-level switch to assign: tests and benchmarks use `config` too.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple


def _bool_env(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    if v not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {v!r}")
    return v == "1"


def _blocks_env(name: str):
    v = os.environ.get(name)
    if not v:
        return None
    try:
        blocks = tuple(int(x) for x in v.split(","))
    except ValueError:
        blocks = ()
    return _check_blocks(name, blocks if len(blocks) == 2 else v)


def _check_blocks(name: str, value):
    if value is None:
        return None
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b >= 16 and b & (b - 1) == 0 for b in value))
    if not ok:
        raise ValueError(f"{name} must be two powers of two >= 16 (query block, key block) like (128, 64), "
                         f"got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its default (or the environment variable that supplies it), the values it takes
    (`choices`, or a `check` that returns the normalised value or raises) and what it does."""
    default: Any
    doc: str
    choices: Optional[Tuple[Any, ...]] = None
    env: Optional[str] = None
    from_env: Optional[Callable[[str], Any]] = None
    check: Optional[Callable[[str, Any], Any]] = None

    def validate(self, name: str, value):
        if self.choices is not None:
            if isinstance(value, bool) != isinstance(self.choices[0], bool) or value not in self.choices:
                raise ValueError(f"dtk.config: {name} must be one of {', '.join(map(repr, self.choices))}, "
                                 f"got {value!r}")
            return value
        return self.check(name, value) if self.check else value

    def default_value(self):
        if self.env is None or os.environ.get(self.env) in (None, ""):
            return self.default
        if self.from_env is not None:
            return self.from_env(self.env)
        v = os.environ[self.env]
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"{self.env} must be one of {', '.join(self.choices)}, got {v!r}")
        return v


def _bool(default: bool, doc: str, env: Optional[str] = None) -> Option:
    return Option(default, doc, choices=(True, False), env=env,
                  from_env=(lambda name: _bool_env(name, default)) if env else None)


def _positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dtk.config: {name} must be an int >= 1, got {value!r}")
    return value


# Every setting dtk reads. Engine names: "auto" lets the family's engine module choose
# (ops/<family>/engine.py); any other name pins that engine, and a call it cannot serve is an
# error that says why.
OPTIONS: Dict[str, Option] = {
    # --- engines
    "window_engine": Option(
        "auto", "GPU engine of window_attention: auto (the measured default: the main Triton engine), "
        "triton, or triton-single-loop (the unmeasured warp-specialized forward, ops/window/triton_single_loop.py)",
        choices=("auto", "triton", "triton-single-loop"), env="DTK_WINDOW_ENGINE"),
    "sparse_engine": Option(
        "auto", "GPU engine of multi_kv_attention and segment_attention: auto (cuDNN where it serves the "
        "call, else Triton), triton or cudnn", choices=("auto", "triton", "cudnn"), env="DTK_SPARSE_ENGINE"),
    # --- window engine variants
    "window_blocks": Option(
        None, "(query block, key block) of the window engine on a GPU, instead of its rule and timing "
              "(block-size sweeps)", env="DTK_WINDOW_BLOCKS", from_env=_blocks_env, check=_check_blocks),
    "window_prefix_by_dense": _bool(
        True, "the prefix (global) query rows of window_attention by the dense kernel (cuDNN) on a side "
              "stream, instead of the Triton kernel's own prefix programs"),
    "window_mask_by_dot": _bool(
        True, "box windows mask their partial key blocks with small tensor-core dots instead of "
              "testing each score"),
    # --- linear engine variants
    "linear_state_ks_by_dot": _bool(
        True, "the state kernel sums phi(k) with a dot against a ones tile (the features the kv sum "
              "sees) instead of a row reduction"),
    "linear_apply_den_by_dot": _bool(
        True, "the apply kernel computes the denominator with a dot instead of a row reduction"),
    "linear_programs_per_sm": Option(
        2, "linear attention's state pass splits long sequences into chunks until it has this many "
           "programs per SM", check=_positive_int),
    "linear_state_atomic": _bool(
        True, "the chunks of a split state pass add into the state with fp32 atomics (off: per-chunk "
              "slots and a sum, bitwise reproducible; deterministic mode always takes the slots)"),
    # --- tuning and debugging
    "autotune": _bool(
        True, "GPU kernels time their candidate launch configurations (and the window engine its "
              "block sizes) on a problem's first call; off: the default configuration",
        env="DTK_TRITON_AUTOTUNE"),
    "check_indices": _bool(
        False, "index arguments on a GPU (q_index, kv_index, scatter_blend's index) are validated "
               "too, range and duplicates, at one host sync per call", env="DTK_CHECK_INDICES"),
    "nan_fill": _bool(False, "outputs are allocated NaN-filled (an unwritten row shows)", env="DTK_DEBUG_NAN_FILL"),
}

_SCOPE: contextvars.ContextVar = contextvars.ContextVar("dtk_config", default={})


def get(name: str):
    """The value of setting `name` for this call: the innermost `config` scope that sets it, else
    its environment variable, else its default."""
    scope = _SCOPE.get()
    if name in scope:
        return scope[name]
    try:
        opt = OPTIONS[name]
    except KeyError:
        raise KeyError(f"dtk has no setting {name!r}; settings: {', '.join(OPTIONS)}") from None
    return opt.default_value()


def current() -> Dict[str, Any]:
    """Every setting's value for a call made now (what `dtk.config()` with no argument returns)."""
    return {name: get(name) for name in OPTIONS}


@contextlib.contextmanager
def _scope(overrides: Dict[str, Any]):
    token = _SCOPE.set({**_SCOPE.get(), **overrides})
    try:
        yield current()
    finally:
        _SCOPE.reset(token)


def config(**overrides):
    """A scope (context manager) in which the given settings hold; also a decorator. Unknown names
    and values outside a setting's choices are errors that list what is allowed. The settings
    (`dtk.config_options()` describes each):

    window_engine, sparse_engine; window_blocks, window_prefix_by_dense, window_mask_by_dot;
    linear_state_ks_by_dot, linear_apply_den_by_dot, linear_programs_per_sm, linear_state_atomic;
    autotune, check_indices, nan_fill.
    """
    checked = {}
    for name, value in overrides.items():
        if name not in OPTIONS:
            raise TypeError(f"dtk.config: unknown setting {name!r}; settings: {', '.join(OPTIONS)}")
        checked[name] = OPTIONS[name].validate(name, value)
    return _scope(checked)


def config_options() -> Dict[str, str]:
    """Each setting with its choices (or default) and what it does."""
    out = {}
    for name, opt in OPTIONS.items():
        allowed = f"one of {', '.join(map(repr, opt.choices))}" if opt.choices else f"default {opt.default!r}"
        env = f"; default from ${opt.env}" if opt.env else ""
        out[name] = f"{allowed}{env}: {opt.doc}"
    return out


# ----------------------------------------------------------------------------- engines that served

_LAST_ENGINE: Dict[str, str] = {}


def record_engine(op: str, engine: str) -> None:
    """Notes which engine served the latest call of op (dtk.last_engine)."""
    _LAST_ENGINE[op] = engine


def last_engine(op: str) -> Optional[str]:
    """The engine that served the latest call of `op` in this process ("cpp", "triton", "cudnn",
    "reference", ...), or None before its first call. Ops are named as in torch.ops.dtk
    (e.g. "window_attention", "multi_kv_attention"); CPU calls are served by the C++ engine."""
    return _LAST_ENGINE.get(op)


# ----------------------------------------------------------------------- a fast path that failed

_WARNED: set = set()


def fallback_warning(where: str, key, err: Exception, instead: str) -> None:
    """Says, once per (where, problem key), that a fast path failed on a call and which engine
    serves it instead; the next call tries the fast path again."""
    if (where, key) in _WARNED:
        return
    _WARNED.add((where, key))
    warnings.warn(f"{where}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}; "
                  f"this call uses {instead}", RuntimeWarning, stacklevel=3)
