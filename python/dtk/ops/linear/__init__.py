"""Linear attention: LinFusion's normalised linear attention and its additive state (for sharded /
tiled / chunked sequences). MEMO's memory linear attention is its own family, ``dtk.ops.memo``.

Engines: ``reference.py`` (pure PyTorch, float64-capable), C++ CPU kernels (``csrc/linear/cpu.cpp``),
Triton GPU kernels (``triton_forward.py``, ``triton_backward.py``) chosen and launched by
``engine.py``, registered for the CUDA key in ``_register.py``.

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

from typing import Optional, Tuple

import torch

from ... import _config
from . import _register  # noqa: F401  (fake kernels, autograd, CUDA kernels)
from .checks import check_apply, check_linear_attention, check_state
from .reference import FEATURE_MAPS

__all__ = ["linear_attention", "linear_attention_state", "linear_attention_apply", "FEATURE_MAPS"]

LinearState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _record_cpu(op: str, t: torch.Tensor):
    """CPU tensors are served by the C++ kernels (CUDA calls record in engine.py)."""
    if t.device.type == "cpu":
        _config.record_engine(op, "cpp")


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
    check_linear_attention(q, k, v, feature_map, normalize, eps, scale, cu_seqlens, cu_seqlens_k)
    _record_cpu("linear_attention", q)
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
    check_state(k, v, feature_map, cu_seqlens)
    _record_cpu("linear_attention_state", k)
    return torch.ops.dtk.linear_attention_state(k, v, feature_map, cu_seqlens)


def linear_attention_apply(q: torch.Tensor, kv_sum: torch.Tensor, k_sum: torch.Tensor, count: torch.Tensor, *,
                           feature_map: str = "elu1", normalize: bool = True, eps: float = 1e-4,
                           scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear attention of q against a (summed) state from :func:`linear_attention_state`; the
    same formulas as :func:`linear_attention` with ``N = count``. With ``cu_seqlens`` q is packed
    and sequence ``i`` reads state ``i``. Not differentiable (use ``linear_attention`` to train)."""
    check_apply(q, kv_sum, k_sum, count, feature_map, normalize, eps, scale, cu_seqlens)
    _record_cpu("linear_attention_apply", q)
    return torch.ops.dtk.linear_attention_apply(q, kv_sum, k_sum, count, feature_map, bool(normalize), float(eps),
                                                None if scale is None else float(scale), cu_seqlens)

