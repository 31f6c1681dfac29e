"""Argument checks of MEMO's ops, one per op, shared by the public wrappers (``__init__.py``), the
fake kernels and the CUDA kernels (``_register.py`` / ``engine.py``). Messages start with the op
and name the argument."""
from __future__ import annotations

from .._checks import check_device, check_kv_pair, check_qkv_heads, check_state_dtype, check_tensor, check_unit_interval


def check_memory(state, B, H, D, Dv, device, op):
    """state: None or a (kv (B, H, D, Dv), z (B, H, D)) pair of float32/float64 tensors on
    `device`; returns (kv, z), (None, None) without memory."""
    if state is None:
        return None, None
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{op}: state must be None or a (kv (B, H, D, Dv), z (B, H, D)) pair")
    kv, z = state
    if (kv is None) != (z is None):
        raise ValueError(f"{op}: mem_kv and mem_z must be given together")
    if kv is None:
        return None, None
    check_tensor("state[0] (kv)", kv, op, 4, "(B, H, D, Dv)")
    check_tensor("state[1] (z)", z, op, 3, "(B, H, D)")
    if tuple(kv.shape) != (B, H, D, Dv):
        raise ValueError(f"{op}: state[0] (kv) must be {(B, H, D, Dv)}, got {tuple(kv.shape)}")
    if tuple(z.shape) != (B, H, D):
        raise ValueError(f"{op}: state[1] (z) must be {(B, H, D)}, got {tuple(z.shape)}")
    for name, t in (("state[0] (kv)", kv), ("state[1] (z)", z)):
        check_device(name, t, device, op)
        check_state_dtype(name, t, op)
    return kv, z


def check_memory_attention(q, k, v, mem_kv, mem_z, decay, op: str = "dtk.memory_linear_attention"):
    """One clip: q, k, v (B, S, H, D) with the same frames and heads, its optional memory, decay in [0, 1]."""
    check_qkv_heads(q, k, v, op, same_heads=True)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: q and k must have the same number of frames, got {q.shape[1]} and {k.shape[1]}")
    check_unit_interval("decay", decay, op)
    return check_memory(None if mem_kv is None and mem_z is None else (mem_kv, mem_z),
                        q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.device, op)


def check_memory_update(k, v, mem_kv, mem_z, decay, op: str = "dtk.memory_linear_attention_update"):
    """Past frames k, v (B, n, H, D), the optional memory, decay in [0, 1]."""
    check_kv_pair(k, v, op, seq="frames")
    check_unit_interval("decay", decay, op)
    return check_memory(None if mem_kv is None and mem_z is None else (mem_kv, mem_z),
                        k.shape[0], k.shape[2], k.shape[3], v.shape[3], k.device, op)


def check_state_arg(state, op: str):
    """The wrappers' `state` argument: None or a pair, split into (mem_kv, mem_z)."""
    if state is None:
        return None, None
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError(f"{op}: state must be None or a (kv (B, H, D, Dv), z (B, H, D)) pair")
    return state[0], state[1]

