"""Model adapters: thin glue that puts the dtk ops inside diffusers models (diffusers >= 0.35;
tested with the versions named in tests/adapters/README.md: the newest and the oldest).

    import dtk.adapters.flux
    handle = dtk.adapters.flux.apply_local_attention(pipe.transformer, radius=16)
    ...
    dtk.adapters.remove(pipe.transformer)      # original processors, hooks and weights back

Families: :mod:`dtk.adapters.flux` (CLEAR, condition reuse, SpotEdit), :mod:`dtk.adapters.wan`
(FreeSwim, DualParal), :mod:`dtk.adapters.sd` (LinFusion). Each ``apply_*`` installs attention
processors through diffusers' processor API and, where the model's per-forward geometry is needed,
forward hooks on the model; all state lives in the returned handle (stored on the model), so
adapted models never interfere and a new resolution needs no re-apply. Importing this package does
not import diffusers; the family modules do.
"""
from __future__ import annotations

import importlib

from ._common import AdapterHandle, get_handle

__all__ = ["remove", "get_handle", "AdapterHandle", "flux", "wan", "sd"]


def remove(model) -> bool:
    """Restores ``model`` to its state before ``apply_*``: original attention processors, hooks
    removed, base weights overwritten by a weight loader put back, adapter caches dropped.
    Returns False if the model had no dtk adapter."""
    handle = get_handle(model)
    if handle is None:
        return False
    handle.remove()
    return True


def __getattr__(name):
    if name in ("flux", "wan", "sd"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
