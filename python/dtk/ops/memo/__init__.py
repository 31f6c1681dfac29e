"""MEMO's memory linear attention: linear attention over the frames of a clip with a decayed memory
carried from clip to clip (softmax feature maps; q, k, v ``(B, S, H, D)`` with B typically pixels x
batch and S the ~16 frames).

Engines: ``reference.py`` (pure PyTorch, float64-capable), C++ CPU kernels (``csrc/memo/cpu.cpp``),
Triton GPU kernels (``triton.py``) chosen and launched by ``engine.py``, registered for the CUDA
key in ``_register.py``. Memories are float32 (float64 for float64 inputs, which are CPU-only).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ... import _config
from . import _register  # noqa: F401  (fake kernels, autograd, CUDA kernels)
from .checks import check_memory_attention, check_memory_update, check_state_arg

__all__ = ["memory_linear_attention", "memory_linear_attention_update", "MemoryState"]

MemoryState = Tuple[torch.Tensor, torch.Tensor]


def _record_cpu(op: str, t: torch.Tensor):
    """CPU tensors are served by the C++ kernels (CUDA calls record in engine.py)."""
    if t.device.type == "cpu":
        _config.record_engine(op.replace("dtk.", ""), "cpp")


def memory_linear_attention_update(k: torch.Tensor, v: torch.Tensor, state: Optional[MemoryState] = None, *,
                                   decay: float = 0.9) -> MemoryState:
    """MEMO's memory after n past frames (k, v) ``(B, n, H, D)``: ``w_j = decay^(n-1-j)``,
    ``KV_new = sum_j (w_j phi_k_j)(w_j v_j)^T``, ``Z_new = sum_j w_j phi_k_j`` (phi_k = softmax over
    the frames), ``M <- decay^n M + new`` (``M = new`` when ``state`` is None). Returns
    ``(kv (B, H, D, D_v), z (B, H, D))`` in float32 (float64 for float64 inputs)."""
    op = "dtk.memory_linear_attention_update"
    kv, z = check_memory_update(k, v, *check_state_arg(state, op), decay, op)
    _record_cpu(op, k)
    return torch.ops.dtk.memory_linear_attention_update(k, v, kv, z, float(decay))


def memory_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[MemoryState] = None,
                            *, decay: float = 0.9,
                            update_with: Union[None, bool, int, Tuple[torch.Tensor, torch.Tensor]] = None,
                            ) -> Tuple[torch.Tensor, Optional[MemoryState]]:
    """MEMO's memory linear attention over the frames of a clip; q, k, v ``(B, S, H, D)`` where B is
    typically pixels x batch and S the (~16) frames. ``phi_q = softmax(q, features) * D^-1/2``,
    ``phi_k = softmax(k, frames)``; with memory ``M = (KV, Z)`` (``state``):
    ``KV = decay * M_KV + sum_i phi_k_i v_i^T``, ``Z = decay * M_Z + sum_i phi_k_i``,
    ``o_i = (phi_q_i . KV) / max(phi_q_i . Z, 1e-10)`` (plain sums when ``state`` is None).

    Returns ``(out, new_state)``. ``update_with`` picks the past frames the memory is updated with
    (see :func:`memory_linear_attention_update`):

    * ``None`` (default) or ``True``: all frames of this clip (k, v), computed with the output by one
      fused op (``memory_linear_attention_step``);
    * an int ``n``: the last ``n`` frames of this clip;
    * a ``(k_p, v_p)`` pair: those frames;
    * ``False``: no update, ``state`` is returned unchanged.
    """
    op = "dtk.memory_linear_attention"
    mkv, mz = check_memory_attention(q, k, v, *check_state_arg(state, op), decay, op)
    if update_with is None or update_with is True:
        # The memory updated with this clip's own k, v: one fused op reads them and the memory once.
        _record_cpu("memory_linear_attention_step", q)
        out, nkv, nz = torch.ops.dtk.memory_linear_attention_step(q, k, v, mkv, mz, float(decay))
        return out, (nkv, nz)
    _record_cpu("memory_linear_attention", q)
    out = torch.ops.dtk.memory_linear_attention(q, k, v, mkv, mz, float(decay))
    if update_with is False:
        return out, state
    if isinstance(update_with, int):
        if not 0 < update_with <= k.shape[1]:
            raise ValueError(f"{op}: update_with (an int) must be in [1, {k.shape[1]}], got {update_with}")
        kp, vp = k[:, -update_with:], v[:, -update_with:]
    elif isinstance(update_with, (tuple, list)) and len(update_with) == 2:
        kp, vp = update_with
    else:
        raise TypeError(f"{op}: update_with must be None, False, an int or a (k_p, v_p) pair, got {update_with!r}")
    return out, memory_linear_attention_update(kp, vp, state, decay=decay)
