"""Linear attention: LinFusion's normalised linear attention, its additive state (for sharded /
tiled / chunked sequences) and MEMO's memory linear attention with a decayed state.

Engines: ``reference.py`` (pure PyTorch, float64-capable), C++ CPU kernels (``csrc/linear/cpu.cpp``),
Triton GPU kernels (``triton.py``), registered for the CUDA key in ``_register.py``.

Layouts follow FlashAttention: q ``(B, S_q, H, D)``, k ``(B, S_k, H_kv, D)``, v ``(B, S_k, H_kv, D_v)``,
any strides on B/S/H (last dim contiguous is fastest). GQA: ``H % H_kv == 0``, query head ``h``
reads key/value head ``h // (H // H_kv)``. Accumulation is float32 (float64 for float64 inputs);
outputs have the input dtype; states are float32 (float64 for float64 inputs, which are CPU-only).

Packed variable-length sequences (``cu_seqlens``, int32, FlashAttention convention): q, k and v
are ``(1, total, H, D)``. By default q and k share ``cu_seqlens`` (self-attention: sequence ``i``
is rows ``cu_seqlens[i]:cu_seqlens[i+1]`` of q, k and v, and attends only within itself);
``linear_attention`` also takes ``cu_seqlens_k`` (FlashAttention's ``cu_seqlens_q`` /
``cu_seqlens_k``): then ``cu_seqlens`` packs q and ``cu_seqlens_k`` packs k and v, and their
totals may differ.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _register  # noqa: F401  (fake kernels, autograd, CUDA kernels)
from .reference import FEATURE_MAPS

__all__ = ["linear_attention", "linear_attention_state", "linear_attention_apply", "memory_linear_attention",
           "memory_linear_attention_update", "FEATURE_MAPS"]

LinearState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MemoryState = Tuple[torch.Tensor, torch.Tensor]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, op: str, dims: int = 4, layout: str = "(B, S, H, D)"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _check_float(name: str, t, op: str, dtype=None):
    if t.dtype not in _FLOAT:
        raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (like q), got {t.dtype}")


def _check_device(name: str, t, device, op: str):
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (like q), got {t.device}")


def _check_feature_map(feature_map, op: str):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _check_eps(eps, op: str):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a number > 0, got {eps!r}")


def _check_normalize_scale(normalize, scale, op: str):
    if not isinstance(normalize, bool):
        raise TypeError(f"{op}: normalize must be a bool, got {normalize!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be None or a float, got {scale!r}")


def _check_cu_seqlens(cu_seqlens, total: int, device, op: str, batch: int, name: str = "cu_seqlens"):
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: {name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"{op}: with {name} the inputs must be packed as (1, total, H, D), got batch {batch}")
    if not torch.compiler.is_compiling():  # host sync: skipped while tracing
        c = cu_seqlens.tolist()
        if c[0] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {c[0]}")
        for i in range(1, len(c)):
            if c[i] < c[i - 1]:
                raise ValueError(f"{op}: {name} must be non-decreasing, got {c[i - 1]} then {c[i]} at index {i}")
        if c[-1] != total:
            raise ValueError(f"{op}: {name} must end at the packed length {total}, got {c[-1]}")
    return cu_seqlens


def _check_kv(k, v, op: str, seq: str = "sequence length"):
    """k and v: (B, S, H, D) floating tensors, same dtype and device, matching in B, S (`seq`) and H."""
    _check_tensor("k", k, op)
    _check_tensor("v", v, op)
    _check_float("k", k, op)
    _check_float("v", v, op, k.dtype)
    _check_device("v", v, k.device, op)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must match k in batch, {seq} and heads, got v {tuple(v.shape)}, k {tuple(k.shape)}")


def _check_qkv(q, k, v, op: str, same_heads: bool = False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, op)
    _check_float("q", q, op)
    _check_float("k", k, op, q.dtype)
    _check_float("v", v, op, q.dtype)
    _check_device("k", k, q.device, op)
    _check_device("v", v, q.device, op)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q, k and v must have the same batch size, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k must have q's head dim {q.shape[3]}, got k {tuple(k.shape)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: v must match k in sequence length and heads, got v {tuple(v.shape)}, "
                         f"k {tuple(k.shape)}")
    if same_heads:
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"{op}: k and v must have q's number of heads {q.shape[2]}, got {k.shape[2]}")
    elif k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{op}: the heads of q ({q.shape[2]}) must be a multiple of the heads of k ({k.shape[2]})")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu1",
                     normalize: bool = True, eps: float = 1e-4, scale: Optional[float] = None,
                     cu_seqlens: Optional[torch.Tensor] = None,
                     cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal linear attention. Returns ``(B, S_q, H, D_v)`` in q's dtype.

    ``phi`` (``feature_map``: "elu1" = elu(x)+1, "relu", "identity") is applied to ``q * scale``
    (``scale`` only when given; LinFusion uses none) and to k.

    * ``normalize=True`` (LinFusion): ``S = (1/N) sum_j phi(k_j) v_j^T``,
      ``o_i = phi(q_i) S / (phi(q_i) . mean_j phi(k_j) + eps)``;
    * ``normalize=False``: ``o_i = phi(q_i) sum_j phi(k_j) v_j^T``.

    S_q may differ from S_k. With ``cu_seqlens`` (int32, ``(num_seqs + 1,)``) q, k, v are packed
    ``(1, total, ., .)`` and, alone, q and k **share** ``cu_seqlens``. With ``cu_seqlens_k`` too
    (int32, as many sequences; FlashAttention's ``cu_seqlens_q`` / ``cu_seqlens_k``), ``cu_seqlens``
    packs q (and the output) and ``cu_seqlens_k`` packs k and v: the queries of sequence ``i``
    (rows ``cu_seqlens[i]:cu_seqlens[i+1]`` of q) attend to its keys (rows
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k and v); the totals of q and k may differ and either
    side of a sequence may be empty (queries without keys get 0). Differentiable in q, k and v.
    """
    op = "dtk.linear_attention"
    _check_qkv(q, k, v, op)
    _check_feature_map(feature_map, op)
    _check_eps(eps, op)
    _check_normalize_scale(normalize, scale, op)
    if cu_seqlens_k is not None:
        if cu_seqlens is None:
            raise ValueError(f"{op}: cu_seqlens_k (the packing of k and v) needs cu_seqlens (the packing of q)")
    elif cu_seqlens is not None and k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: with cu_seqlens alone q and k share the packing (pass cu_seqlens_k to pack k and v "
                         f"apart); got lengths {q.shape[1]} and {k.shape[1]}")
    _check_cu_seqlens(cu_seqlens, q.shape[1], q.device, op, q.shape[0])
    _check_cu_seqlens(cu_seqlens_k, k.shape[1], q.device, op, k.shape[0], "cu_seqlens_k")
    if cu_seqlens_k is not None and cu_seqlens_k.shape[0] != cu_seqlens.shape[0]:
        raise ValueError(f"{op}: cu_seqlens_k must describe as many sequences as cu_seqlens "
                         f"({cu_seqlens.shape[0] - 1}), got {cu_seqlens_k.shape[0] - 1}")
    return torch.ops.dtk.linear_attention(q, k, v, feature_map, bool(normalize), float(eps),
                                          None if scale is None else float(scale), cu_seqlens, cu_seqlens_k)


def linear_attention_state(k: torch.Tensor, v: torch.Tensor, *, feature_map: str = "elu1",
                           cu_seqlens: Optional[torch.Tensor] = None) -> LinearState:
    """The additive state of a key/value sequence (or shard of one):
    ``(kv_sum (B, H_kv, D, D_v), k_sum (B, H_kv, D), count (B,) int64)`` with
    ``kv_sum = sum_j phi(k_j) v_j^T``, ``k_sum = sum_j phi(k_j)``, ``count = S_k``; float32 (float64
    for float64 inputs). States of shards add elementwise, and ``linear_attention_apply`` of the
    sum equals ``linear_attention`` over the whole sequence. With ``cu_seqlens`` the leading
    dimension is the number of packed sequences."""
    op = "dtk.linear_attention_state"
    _check_kv(k, v, op)
    _check_feature_map(feature_map, op)
    _check_cu_seqlens(cu_seqlens, k.shape[1], k.device, op, k.shape[0])
    return torch.ops.dtk.linear_attention_state(k, v, feature_map, cu_seqlens)


def linear_attention_apply(q: torch.Tensor, kv_sum: torch.Tensor, k_sum: torch.Tensor, count: torch.Tensor, *,
                           feature_map: str = "elu1", normalize: bool = True, eps: float = 1e-4,
                           scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear attention of q against a (summed) state from :func:`linear_attention_state`; the
    same formulas as :func:`linear_attention` with ``N = count``. With ``cu_seqlens`` q is packed
    and sequence ``i`` reads state ``i``. Not differentiable (use ``linear_attention`` to train)."""
    op = "dtk.linear_attention_apply"
    _check_tensor("q", q, op)
    _check_float("q", q, op)
    _check_tensor("kv_sum", kv_sum, op, 4, "(B, H_kv, D, D_v)")
    _check_tensor("k_sum", k_sum, op, 3, "(B, H_kv, D)")
    _check_tensor("count", count, op, 1, "(B,)")
    for name, t in (("kv_sum", kv_sum), ("k_sum", k_sum), ("count", count)):
        _check_device(name, t, q.device, op)
    for name, t in (("kv_sum", kv_sum), ("k_sum", k_sum)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if count.dtype != torch.int64:
        raise TypeError(f"{op}: count must be int64, got {count.dtype}")
    n, Hkv, D = kv_sum.shape[:3]
    if D != q.shape[3]:
        raise ValueError(f"{op}: kv_sum must have q's head dim {q.shape[3]}, got {tuple(kv_sum.shape)}")
    if tuple(k_sum.shape) != (n, Hkv, D):
        raise ValueError(f"{op}: k_sum must be {(n, Hkv, D)}, got {tuple(k_sum.shape)}")
    if count.shape[0] != n:
        raise ValueError(f"{op}: count must be ({n},), got {tuple(count.shape)}")
    if Hkv == 0 or q.shape[2] % Hkv != 0:
        raise ValueError(f"{op}: the heads of q ({q.shape[2]}) must be a multiple of the state's heads ({Hkv})")
    _check_feature_map(feature_map, op)
    _check_eps(eps, op)
    _check_normalize_scale(normalize, scale, op)
    if cu_seqlens is None:
        if n != q.shape[0]:
            raise ValueError(f"{op}: the state's batch {n} must equal q's batch {q.shape[0]}")
    else:
        _check_cu_seqlens(cu_seqlens, q.shape[1], q.device, op, q.shape[0])
        if cu_seqlens.shape[0] - 1 != n:
            raise ValueError(f"{op}: cu_seqlens describes {cu_seqlens.shape[0] - 1} sequences but the state has {n}")
    return torch.ops.dtk.linear_attention_apply(q, kv_sum, k_sum, count, feature_map, bool(normalize), float(eps),
                                                None if scale is None else float(scale), cu_seqlens)


def _check_memory(state, B, H, D, Dv, device, op):
    if state is None:
        return None, None
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{op}: state must be None or a (kv (B, H, D, Dv), z (B, H, D)) pair")
    kv, z = state
    _check_tensor("state[0] (kv)", kv, op, 4, "(B, H, D, Dv)")
    _check_tensor("state[1] (z)", z, op, 3, "(B, H, D)")
    if tuple(kv.shape) != (B, H, D, Dv):
        raise ValueError(f"{op}: state[0] (kv) must be {(B, H, D, Dv)}, got {tuple(kv.shape)}")
    if tuple(z.shape) != (B, H, D):
        raise ValueError(f"{op}: state[1] (z) must be {(B, H, D)}, got {tuple(z.shape)}")
    for name, t in (("state[0] (kv)", kv), ("state[1] (z)", z)):
        _check_device(name, t, device, op)
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    return kv, z


def memory_linear_attention_update(k: torch.Tensor, v: torch.Tensor, state: Optional[MemoryState] = None, *,
                                   decay: float = 0.9) -> MemoryState:
    """MEMO's memory after n past frames (k, v) ``(B, n, H, D)``: ``w_j = decay^(n-1-j)``,
    ``KV_new = sum_j (w_j phi_k_j)(w_j v_j)^T``, ``Z_new = sum_j w_j phi_k_j`` (phi_k = softmax over
    the frames), ``M <- decay^n M + new`` (``M = new`` when ``state`` is None). Returns
    ``(kv (B, H, D, D_v), z (B, H, D))`` in float32 (float64 for float64 inputs)."""
    op = "dtk.memory_linear_attention_update"
    _check_kv(k, v, op, seq="frames")
    if not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay!r}")
    kv, z = _check_memory(state, k.shape[0], k.shape[2], k.shape[3], v.shape[3], k.device, op)
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
    _check_qkv(q, k, v, op, same_heads=True)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: q and k must have the same number of frames, got {q.shape[1]} and {k.shape[1]}")
    if not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay!r}")
    mkv, mz = _check_memory(state, q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.device, op)
    if update_with is None or update_with is True:
        # The memory updated with this clip's own k, v: one fused op reads them and the memory once.
        out, nkv, nz = torch.ops.dtk.memory_linear_attention_step(q, k, v, mkv, mz, float(decay))
        return out, (nkv, nz)
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
