"""Stable Diffusion adapter (``UNet2DConditionModel``, SD 1.5 / 2.1 / XL), installed through
diffusers' attention-processor API:

* :func:`apply_linear_attention` — LinFusion: every self-attention (``attn1``) becomes LinFusion's
  normalised linear attention (``dtk.linear_attention``, feature map elu+1, no 1/sqrt(d)) with
  residual MLPs on the inputs of the q and k projections; cross-attention is untouched. Loads
  state dicts in LinFusion's released layout.

Linear attention has no resolution-dependent state: any latent size works without re-applying.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import torch

from ..ops.linear import linear_attention
from ._common import AdapterHandle, check_diffusers, get_handle

__all__ = ["apply_linear_attention", "load_linfusion_weights", "LinFusionHandle", "LinFusionAttnProcessor"]


def _mlp(dim: int, mid: int) -> torch.nn.Sequential:
    # LinFusion's layout: Linear -> LayerNorm -> LeakyReLU -> Linear (state-dict indices 0, 1, 3).
    return torch.nn.Sequential(torch.nn.Linear(dim, mid), torch.nn.LayerNorm(mid),
                               torch.nn.LeakyReLU(inplace=True), torch.nn.Linear(mid, dim))


class LinFusionAttnProcessor(torch.nn.Module):
    """LinFusion's self-attention for one SD ``attn1``:
    ``q = to_q(x + to_q_(x))``, ``k = to_k(x + to_k_(x))``, ``v = to_v(x)``, per head
    ``o_i = phi(q_i) S / (phi(q_i) . mean_j phi(k_j) + 1e-4)`` with ``S = (1/N) sum_j phi(k_j) v_j^T``
    and ``phi = elu + 1``; then ``to_out``. ``to_q_`` / ``to_k_`` are the residual MLPs."""

    def __init__(self, dim: int, mid_dim: Optional[int] = None):
        super().__init__()
        mid = dim if mid_dim is None else int(mid_dim)
        self.to_q_ = _mlp(dim, mid)
        self.to_k_ = _mlp(dim, mid)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("dtk LinFusion processor: attention_mask is not supported in self-attention")
        if encoder_hidden_states is not None:
            raise NotImplementedError("dtk LinFusion processor replaces self-attention only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        x = hidden_states
        q = attn.to_q(x + self.to_q_(x)).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(x + self.to_k_(x)).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(x).unflatten(-1, (attn.heads, -1))
        out = linear_attention(q, k, v, feature_map="elu1", normalize=True, eps=1e-4)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def self_attention_modules(unet) -> List[tuple]:
    """(name, Attention) of every ``attn1`` in ``named_modules`` order — LinFusion's module indices."""
    from diffusers.models.attention_processor import Attention
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and n.split(".")[-1] == "attn1"]


class LinFusionHandle(AdapterHandle):
    kind = "LinFusion linear attention"

    def __init__(self, model):
        super().__init__(model)
        self.processors: Dict[str, LinFusionAttnProcessor] = {}


def apply_linear_attention(unet, state_dict: Optional[Mapping[str, torch.Tensor]] = None, *,
                           mid_dim: Optional[int] = None) -> LinFusionHandle:
    """LinFusion on a diffusers ``UNet2DConditionModel``: every self-attention (``attn1``) becomes
    normalised linear attention with residual MLPs on q and k (Linear -> LayerNorm -> LeakyReLU ->
    Linear, hidden size ``mid_dim``, default the attention's width); cross-attention (``attn2``)
    is untouched.

    ``state_dict``: LinFusion's released weights (see :func:`load_linfusion_weights`); without it
    the MLPs have PyTorch's default initialisation (LinFusion before distillation).
    Returns a handle; ``dtk.adapters.remove(unet)`` restores the original processors and weights.
    """
    check_diffusers()
    from diffusers import UNet2DConditionModel
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    mods = self_attention_modules(unet)
    mids = _mid_dims(state_dict, mods) if state_dict is not None else {}
    handle = LinFusionHandle(unet)
    ref = next(unet.parameters())
    for i, (name, attn) in enumerate(mods):
        dim = attn.to_q.in_features
        if attn.to_q.out_features != dim:
            raise ValueError(f"{name}: LinFusion needs a square q projection, got {attn.to_q.weight.shape}")
        proc = LinFusionAttnProcessor(dim, mids.get(i, mid_dim)).to(device=ref.device, dtype=ref.dtype)
        handle.set_processor(attn, proc)
        handle.processors[name] = proc
    handle._attach()
    if state_dict is not None:
        try:
            load_linfusion_weights(unet, state_dict)
        except Exception:
            handle.remove()              # leave the UNet as it was
            raise
    return handle


_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def _normalise(state_dict, mods):
    """LinFusion keys -> {(module index, parameter path)}; accepts its ModelMixin layout
    (``"<i>.to_q_.0.weight"``, i = attn1 index) and full module paths
    (``"<module>.to_q_.0.weight"`` or ``"<module>.processor.to_q_.0.weight"``)."""
    index = {name: i for i, (name, _) in enumerate(mods)}
    out, unknown = {}, []
    for key, value in state_dict.items():
        m = _INDEXED.match(key)
        if m and int(m.group(1)) < len(mods):
            out[(int(m.group(1)), m.group(2))] = value
            continue
        for name, i in index.items():
            if key.startswith(name + "."):
                rest = key[len(name) + 1:]
                out[(i, rest[len("processor."):] if rest.startswith("processor.") else rest)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def _mid_dims(state_dict, mods):
    sd, _ = _normalise(state_dict, mods)
    return {i: v.shape[0] for (i, p), v in sd.items() if p == "to_q_.0.weight"}


def load_linfusion_weights(unet, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True):
    """Loads LinFusion weights into a UNet adapted by :func:`apply_linear_attention`: the MLPs
    (``to_q_.*``, ``to_k_.*``) and, when present, the distilled ``to_q/to_k/to_v/to_out.0`` of each
    ``attn1`` (the replaced base weights are kept on the CPU so ``remove`` restores them).
    With ``strict``, missing MLP keys or unknown keys raise a ``KeyError`` listing them; otherwise
    returns ``(missing, unexpected)``."""
    handle = get_handle(unet)
    if not isinstance(handle, LinFusionHandle):
        raise RuntimeError("load_linfusion_weights: apply dtk.adapters.sd.apply_linear_attention(unet) first")
    mods = self_attention_modules(unet)
    sd, unknown = _normalise(state_dict, mods)
    targets = {}
    for i, (name, attn) in enumerate(mods):
        for p, t in handle.processors[name].named_parameters():
            targets[(i, p)] = (f"{name}.processor.{p}", t, False)
        for p, t in attn.named_parameters():
            if p.split(".")[0] in ("to_q", "to_k", "to_v", "to_out"):
                targets[(i, p)] = (f"{name}.{p}", t, True)
    required = {k for k, (_, _, base) in targets.items() if not base}
    missing = sorted(f"{i}.{p}" for i, p in required - sd.keys())
    unexpected = sorted(unknown + [f"{i}.{p}" for i, p in sd.keys() - targets.keys()])
    if strict and (missing or unexpected):
        raise KeyError("load_linfusion_weights: state dict does not match the adapted UNet.\n"
                       f"  missing keys ({len(missing)}): {_short(missing)}\n"
                       f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    with torch.no_grad():
        for key in sorted(sd.keys() & targets.keys()):
            full, t, base = targets[key]
            value = sd[key]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"load_linfusion_weights: {full} has shape {tuple(value.shape)}, expected {tuple(t.shape)}")
            if base:
                handle.backup_parameter(full, t)
            t.copy_(value.to(device=t.device, dtype=t.dtype))
    return missing, unexpected


def _short(keys, n=8):
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") if keys else "none"
