"""Cache objects for step-to-step reuse in diffusion sampling (SpotEdit, OminiControl2, DualParal,
FreeSwim). Every cache is an ordinary object holding its own tensors: no module globals, so two
models (or two pipelines) in one process keep separate caches.

- ``RefreshPolicy``: when a cache entry is (re)written: on step 0, then every ``every`` steps
  (``every=None``: only on step 0, i.e. compute once and reuse, as for OminiControl's condition K/V).
- ``KVCache``: per-layer (k, v) with the policy, byte accounting, optional CPU offload and reset.
- ``OutputCache``: per-layer output tensor (FreeSwim's full-attention cross-attention output,
  refreshed every N steps).

Typical use inside an attention layer::

    cache = KVCache(policy=RefreshPolicy(every=5))          # one per model
    for step in range(num_steps):
        cache.set_step(step)
        ...
        k_c, v_c = cache.get_or_compute(layer_idx, lambda: (k_cond, v_cond))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = ["RefreshPolicy", "KVCache", "OutputCache"]


@dataclass(frozen=True)
class RefreshPolicy:
    """Write on step ``first`` (default 0) and then every ``every`` steps after it; read otherwise.
    ``every=None`` writes only once. Steps before ``first`` also write (nothing cached yet)."""
    every: Optional[int] = None
    first: int = 0

    def __post_init__(self):
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every must be a positive int or None, got {self.every!r}")
        if not isinstance(self.first, int) or self.first < 0:
            raise ValueError(f"first must be a non-negative int, got {self.first!r}")

    def should_write(self, step: int) -> bool:
        if step <= self.first:
            return True
        return self.every is not None and (step - self.first) % self.every == 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _LayerCache:
    """Per-layer tuples of tensors under a refresh policy (shared machinery of the caches)."""

    def __init__(self, policy: Optional[RefreshPolicy] = None, *, offload: bool = False,
                 offload_device: str = "cpu"):
        self.policy = policy if policy is not None else RefreshPolicy()
        self.offload = bool(offload)
        self.offload_device = torch.device(offload_device)
        self.step = 0
        self._store: Dict[Hashable, Tuple[torch.Tensor, ...]] = {}
        self._home: Dict[Hashable, Tuple[torch.device, ...]] = {}
        self.writes = 0
        self.reads = 0

    # ---- steps and policy
    def set_step(self, step: int) -> None:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step = int(step)

    def next_step(self) -> None:
        self.step += 1

    def should_write(self, layer: Hashable = None, step: Optional[int] = None) -> bool:
        """True when this step (default: the current one) is a write step, or ``layer`` has nothing cached."""
        if layer is not None and layer not in self._store:
            return True
        return self.policy.should_write(self.step if step is None else step)

    # ---- storage
    def _put(self, layer: Hashable, tensors: Tuple[torch.Tensor, ...]) -> None:
        home = tuple(t.device for t in tensors)
        if self.offload:
            pin = torch.cuda.is_available() and self.offload_device.type == "cpu"
            stored = []
            for t in tensors:
                t = t.detach()
                if t.device == self.offload_device:
                    stored.append(t.clone())
                else:
                    dst = torch.empty(t.shape, dtype=t.dtype, device=self.offload_device,
                                      pin_memory=pin and t.device.type == "cuda")
                    dst.copy_(t, non_blocking=True)
                    stored.append(dst)
            tensors = tuple(stored)
        else:
            tensors = tuple(t.detach() for t in tensors)
        self._store[layer] = tensors
        self._home[layer] = home
        self.writes += 1

    def _get(self, layer: Hashable) -> Tuple[torch.Tensor, ...]:
        if layer not in self._store:
            raise KeyError(f"layer {layer!r} has nothing cached (write it first, or check should_write)")
        self.reads += 1
        tensors = self._store[layer]
        if self.offload:
            tensors = tuple(t.to(d, non_blocking=True) for t, d in zip(tensors, self._home[layer]))
        return tensors

    def __contains__(self, layer: Hashable) -> bool:
        return layer in self._store

    def __len__(self) -> int:
        return len(self._store)

    def layers(self):
        return list(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (wherever they live)."""
        return sum(_nbytes(t) for ts in self._store.values() for t in ts)

    def nbytes_on(self, device) -> int:
        """Bytes held on ``device`` (e.g. "cuda" or "cpu"; a device type matches every index)."""
        dev = torch.device(device)
        return sum(_nbytes(t) for ts in self._store.values() for t in ts
                   if t.device.type == dev.type and (dev.index is None or t.device.index == dev.index))

    def reset(self) -> None:
        """Drops every entry and rewinds to step 0 (call between generations)."""
        self._store.clear()
        self._home.clear()
        self.step = 0
        self.writes = 0
        self.reads = 0

    def drop(self, layer: Hashable) -> None:
        self._store.pop(layer, None)
        self._home.pop(layer, None)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self)}, nbytes={self.nbytes}, step={self.step}, "
                f"policy={self.policy}, offload={self.offload})")


class KVCache(_LayerCache):
    """Per-layer K/V cache with a refresh policy.

    ``read`` returns the stored tensors themselves when not offloaded, so in-place updates (e.g.
    ``dtk.scatter_blend`` into the cached K/V, SpotEdit) persist; with ``offload=True`` entries live
    on ``offload_device`` (pinned CPU memory when CUDA is present) and ``read`` returns device
    copies (write them back with ``write`` to keep changes)."""

    def write(self, layer: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError("k and v must be tensors")
        self._put(layer, (k, v))

    def read(self, layer: Hashable) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self._get(layer)
        return k, v

    def get_or_compute(self, layer: Hashable, compute: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """On a write step (or when the layer is empty) calls ``compute()`` -> (k, v), stores and
        returns them; otherwise returns the cached (k, v) without calling it."""
        if self.should_write(layer):
            k, v = compute()
            self.write(layer, k, v)
            return k, v
        return self.read(layer)


class OutputCache(_LayerCache):
    """Per-layer output cache (FreeSwim: the full-attention branch's cross-attention output,
    refreshed every N steps: ``OutputCache(RefreshPolicy(every=N))``)."""

    def write(self, layer: Hashable, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError("out must be a tensor")
        self._put(layer, (out,))

    def read(self, layer: Hashable) -> torch.Tensor:
        return self._get(layer)[0]

    def get_or_compute(self, layer: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.should_write(layer):
            out = compute()
            self.write(layer, out)
            return out
        return self.read(layer)
