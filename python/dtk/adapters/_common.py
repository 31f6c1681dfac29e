"""Shared glue of the model adapters: the handle stored on an adapted model, processor swapping,
forward hooks that see the model's call as keyword arguments, and weight backups for remove()."""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

HANDLE_ATTR = "_dtk_adapter"
MIN_DIFFUSERS = (0, 35)


def check_diffusers() -> str:
    """Returns the installed diffusers version; raises if it is missing or older than 0.35."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError("dtk.adapters needs diffusers >= 0.35: pip install 'dtk[adapters]'") from e
    parts = []
    for p in diffusers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_DIFFUSERS:
        raise ImportError(f"dtk.adapters needs diffusers >= 0.35, found {diffusers.__version__}")
    return diffusers.__version__


class AdapterHandle:
    """What every ``apply_*`` returns; also stored on the model (``model._dtk_adapter``) so
    :func:`dtk.adapters.remove` finds it. All per-model state (grid, caches, counters) lives
    here or in the processors it installed, never in module globals, so two adapted models in one
    process are independent."""

    kind = "adapter"

    def __init__(self, model: torch.nn.Module):
        if getattr(model, HANDLE_ATTR, None) is not None:
            raise RuntimeError(f"{type(model).__name__} already has a dtk adapter "
                               f"({getattr(model, HANDLE_ATTR).kind}); call dtk.adapters.remove(model) first")
        self.model = model
        self._processors: List[Tuple[torch.nn.Module, Any]] = []   # (attention module, original processor)
        self._hooks: List[Any] = []
        self._backup: Dict[str, torch.Tensor] = {}                  # parameter name -> original value (CPU copy)
        self.removed = False

    # -- installation helpers -------------------------------------------------------------------
    def _attach(self):
        object.__setattr__(self.model, HANDLE_ATTR, self)

    def set_processor(self, attn: torch.nn.Module, processor) -> None:
        self._processors.append((attn, attn.processor))
        attn.set_processor(processor)

    def add_hooks(self, pre: Optional[Callable] = None, post: Optional[Callable] = None) -> None:
        """``pre(kwargs) -> kwargs`` sees the model's call as keyword arguments (positional ones bound
        by name); ``post(kwargs, output) -> output``."""
        model = self.model
        sig = inspect.signature(type(model).forward)
        names = [n for n in sig.parameters if n != "self"]

        def _pre(module, args, kwargs):
            kw = dict(zip(names, args))
            kw.update(kwargs)
            if pre is not None:
                kw = pre(kw)
            return (), kw

        self._hooks.append(model.register_forward_pre_hook(_pre, with_kwargs=True))
        if post is not None:
            def _post(module, args, kwargs, output):
                return post(kwargs, output)
            self._hooks.append(model.register_forward_hook(_post, with_kwargs=True))

    def add_output_hook(self, module: torch.nn.Module, fn: Callable[[Any], Any]) -> None:
        """``fn(output) -> output`` on every call of a submodule (removed with the adapter)."""
        self._hooks.append(module.register_forward_hook(lambda mod, args, output: fn(output)))

    def backup_parameter(self, name: str, param: torch.Tensor) -> None:
        """Keeps a CPU copy of a base-model parameter before a weight loader overwrites it."""
        if name not in self._backup:
            self._backup[name] = param.detach().to("cpu", copy=True)

    # -- removal ----------------------------------------------------------------------------------
    def remove(self) -> None:
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        for attn, proc in reversed(self._processors):
            attn.set_processor(proc)
        if self._backup:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self._backup.items():
                    params[name].copy_(value.to(params[name].device))
        self._hooks.clear()
        self._processors.clear()
        self._backup.clear()
        self.reset()
        if getattr(self.model, HANDLE_ATTR, None) is self:
            object.__delattr__(self.model, HANDLE_ATTR)
        self.removed = True

    def reset(self) -> None:
        """Clears caches and step counters (start of a new generation). Subclasses extend it."""

    def __repr__(self):
        return f"<dtk {self.kind} adapter on {type(self.model).__name__}{' (removed)' if self.removed else ''}>"


class TileOrder:
    """An adapter's tile layout: a fixed tile, or ``"auto"`` (``dtk.suggest_tile`` per grid, via
    `suggest`), and the permutations between row-major grid tokens and tile order
    (``dtk.tile_permutation``) per (grid, device), kept for the model's lifetime (a new resolution
    adds one)."""

    def __init__(self, tile, suggest: Optional[Callable[[Tuple[int, ...]], Optional[Tuple[int, ...]]]] = None):
        self.setting = tile
        self.suggest = suggest
        self._tile: Dict[tuple, Optional[Tuple[int, ...]]] = {}
        self._perm: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def tile(self, grid) -> Optional[Tuple[int, ...]]:
        """The tile for `grid` (None: row-major is as good, under "auto")."""
        grid = tuple(grid)
        if self.setting != "auto":
            return self.setting
        if grid not in self._tile:
            self._tile[grid] = self.suggest(grid)
        return self._tile[grid]

    def __call__(self, grid, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(perm, inv): ``x[:, perm]`` is x's grid tokens in tile order, ``y[:, inv]`` undoes it."""
        key = (tuple(grid), torch.device(device))
        if key not in self._perm:
            from ..ops.layout import tile_permutation
            self._perm[key] = tile_permutation(grid, self.tile(grid), device=device)
        return self._perm[key]


def rms_norm_eps(norm, n: int, dtype: torch.dtype) -> Optional[float]:
    """The eps of `norm` when it is a plain RMS norm over the last `n` features: torch.nn.RMSNorm
    (which diffusers >= 0.35 uses for FLUX's and Wan's QK-norms) or diffusers' bias-free RMSNorm;
    else None (the adapters then call the module: not fusable into dtk.rms_norm_rope)."""
    from diffusers.models.normalization import RMSNorm
    if type(norm) is torch.nn.RMSNorm and tuple(norm.normalized_shape) == (n,):
        return torch.finfo(dtype).eps if norm.eps is None else norm.eps
    if type(norm) is RMSNorm and getattr(norm, "bias", None) is None and \
            (norm.weight is None or tuple(norm.weight.shape) == (n,)):
        return norm.eps
    return None


class TensorMemo:
    """A value derived from a tensor (with a host sync), reused while the caller passes that same
    tensor object unchanged. The tensor is held weakly: a new tensor at a freed one's address
    (a data_ptr key would match it) is always recomputed."""

    def __init__(self):
        self._ref = None
        self._key = None
        self.value = None

    def get(self, t: torch.Tensor, compute: Callable[[torch.Tensor], Any], extra: tuple = ()):
        """compute(t), or its value from the last call with this tensor, unchanged, and `extra`."""
        key = (t._version, extra)
        if self._ref is None or self._ref() is not t or key != self._key:
            self.value = compute(t)
            self._ref, self._key = weakref.ref(t), key
        return self.value


class StreamNumbers:
    """Numbers for the tensors that identify a generation's stream (the prompt embeddings a
    pipeline passes at every step, one per CFG branch): the same tensor object keeps its number,
    any other tensor gets a new one, even at a freed tensor's address (where a data_ptr key would
    continue the old generation's step count and reuse its caches). `streams` maps stream keys,
    tuples holding such numbers (and shapes, dtypes), to their state: when a tensor is freed, every
    key holding its number is dropped."""

    def __init__(self, streams: Dict[tuple, Any]):
        self._live: Dict[int, Tuple[weakref.ref, int]] = {}   # id(tensor) -> (weak ref, number)
        self._next = 0
        self._streams = streams

    def _drop(self, number: int) -> None:
        for key in [k for k in self._streams if any(x == number for x in k if isinstance(x, int))]:
            del self._streams[key]

    def __call__(self, t: torch.Tensor) -> int:
        entry = self._live.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        n, key = self._next, id(t)
        self._next += 1

        def freed(_ref, key=key, n=n, live=self._live, drop=self._drop):
            if live.get(key, (None, None))[1] == n:
                del live[key]
            drop(n)
        self._live[key] = (weakref.ref(t, freed), n)
        return n


def parse_tile(tile, ndim: int):
    """None, ``"auto"``, or ``tile`` as ndim ints >= 1 (an int means that size on every axis)."""
    if tile is None or (isinstance(tile, str) and tile == "auto"):
        return tile
    t = (tile,) * ndim if isinstance(tile, int) and not isinstance(tile, bool) else tuple(tile)
    if len(t) != ndim or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t):
        raise ValueError(f"tile must be None, 'auto', an int or {ndim} ints, each >= 1, got {tile!r}")
    return t


def get_handle(model: torch.nn.Module) -> Optional[AdapterHandle]:
    return getattr(model, HANDLE_ATTR, None)


def replace_output_sample(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Applies fn to the sample of a diffusers model output (dataclass or tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    output.sample = fn(output.sample)
    if "sample" in output:
        output["sample"] = output.sample
    return output


def to_bshd(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, S, H, D) view."""
    return x.unflatten(-1, (heads, -1))


def sdpa_bshd(q, k, v, scale=None):
    """Dense attention on (B, S, H, D) tensors (SDPA in its own layout, GQA by repeat)."""
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
