"""Wan adapters (``WanTransformer3DModel``), installed through diffusers' attention-processor API
plus forward hooks on the transformer:

* :func:`apply_inward_window` — FreeSwim: inward 3D window self-attention (``dtk.window_attention``),
  optionally with FreeSwim's dual path: a full-attention branch whose cross-attention output
  (before ``to_out``) replaces the window branch's, cached per layer and refreshed every N steps.

The token grid (frames, rows, cols after patching) is read from the latent's shape on every
forward: any resolution or frame count works without re-applying and without host syncs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..ops.window import window_attention
from ._common import AdapterHandle, check_diffusers, replace_output_sample, sdpa_bshd

__all__ = ["apply_inward_window", "InwardWindowHandle", "WanWindowAttnProcessor", "WanDualCrossAttnProcessor"]


def _check_wan(transformer):
    check_diffusers()
    from diffusers import WanTransformer3DModel
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}")


def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, S, H, D) (interleaved pairs), as WanAttnProcessor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_self_qkv(attn, hidden_states, rotary_emb):
    """q, k, v (B, S, H, D) of a Wan self-attention after QK-norm and RoPE."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
    return q, k, v


def wan_cross_pre_out(attn, hidden_states, encoder_hidden_states):
    """A Wan cross-attention up to (not including) ``to_out``: (B, L, H*D), text plus the I2V image
    context when the layer has one, as WanAttnProcessor."""
    enc_img = None
    if attn.add_k_proj is not None:
        n_img = encoder_hidden_states.shape[1] - 512      # diffusers' convention: 512 text tokens last
        enc_img, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
    q = attn.to_q(hidden_states)
    if getattr(attn, "fused_projections", False):
        k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    out = sdpa_bshd(q, k, v).flatten(2, 3).type_as(q)
    if enc_img is not None:
        if getattr(attn, "fused_projections", False):
            ki, vi = attn.to_added_kv(enc_img).chunk(2, dim=-1)
        else:
            ki, vi = attn.add_k_proj(enc_img), attn.add_v_proj(enc_img)
        ki = attn.norm_added_k(ki)
        ki, vi = ki.unflatten(2, (attn.heads, -1)), vi.unflatten(2, (attn.heads, -1))
        out = out + sdpa_bshd(q, ki, vi).flatten(2, 3).type_as(q)
    return out


class WanContext:
    """Per-model state of one adapted Wan transformer: the grid of the current forward and, for the
    dual path, whether this call refreshes (batch = [window branch; full branch]) or reuses the
    cached cross-attention outputs of its stream."""

    def __init__(self):
        self.grid: Optional[Tuple[int, int, int]] = None
        self.batch: int = 0
        self.mode: str = "window"          # "window" | "refresh" | "cached"
        self.stream = None


class WanWindowAttnProcessor:
    """Inward 3D window self-attention for one Wan ``attn1``. In dual-path refresh calls the second
    half of the batch is the full-attention branch and runs the layer's original processor."""

    def __init__(self, ctx: WanContext, window: Tuple[int, int, int], scale: Optional[float], original):
        self.ctx, self.window, self.scale, self.original = ctx, window, scale, original

    def window_branch(self, attn, hidden_states, rotary_emb):
        q, k, v = wan_self_qkv(attn, hidden_states, rotary_emb)
        out = window_attention(q, k, v, self.ctx.grid, self.window, border="inward", scale=self.scale)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("dtk Wan window processor: attention_mask is not supported")
        if self.ctx.mode == "refresh":
            B = self.ctx.batch
            return torch.cat([self.window_branch(attn, hidden_states[:B], rotary_emb),
                              self.original(attn, hidden_states[B:], None, None, rotary_emb)], dim=0)
        return self.window_branch(attn, hidden_states, rotary_emb)


class WanDualCrossAttnProcessor:
    """FreeSwim's cross-attention override for one Wan ``attn2``: on refresh calls the full branch's
    output before ``to_out`` replaces the window branch's and is cached (per stream); on the other
    calls the cache is used and the cross-attention is not computed at all."""

    def __init__(self, ctx: WanContext):
        self.ctx = ctx
        self.cache: Dict[object, torch.Tensor] = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        ctx = self.ctx
        if ctx.mode == "refresh":
            B = ctx.batch
            full = wan_cross_pre_out(attn, hidden_states[B:], encoder_hidden_states[B:])
            self.cache[ctx.stream] = full
            pre = torch.cat([full, full], dim=0)
        elif ctx.mode == "cached":
            pre = self.cache[ctx.stream]
            if pre.shape[:2] != hidden_states.shape[:2]:
                raise RuntimeError("dtk FreeSwim: the cached cross-attention does not match this call's shape; "
                                   "call handle.reset() between generations")
        else:
            pre = wan_cross_pre_out(attn, hidden_states, encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](pre))


class InwardWindowHandle(AdapterHandle):
    kind = "FreeSwim inward window"

    def __init__(self, model, window, scale, refresh):
        super().__init__(model)
        self.window, self.scale, self.cross_attention_refresh = window, scale, refresh
        self.context = WanContext()
        self.cross_processors: List[WanDualCrossAttnProcessor] = []
        self._calls: Dict[object, int] = {}
        self.refresh_log: List[Tuple[int, bool]] = []    # (stream number, refreshed?) per forward

    def reset(self) -> None:
        """Drops the cached cross-attention outputs and step counters (start of a new video)."""
        self._calls.clear()
        self.refresh_log.clear()
        for p in self.cross_processors:
            p.cache.clear()


def _stream_key(kw):
    # A pipeline passes the same prompt-embedding tensor at every step (one per CFG branch), so its
    # storage identifies the stream whose steps are counted; no host sync is needed.
    enc = kw["encoder_hidden_states"]
    img = kw.get("encoder_hidden_states_image")
    return (enc.data_ptr(), tuple(enc.shape), None if img is None else img.data_ptr(),
            tuple(kw["hidden_states"].shape), kw["hidden_states"].dtype)


def apply_inward_window(transformer, window: Sequence[int] = (-1, 31, 53), *, scale: Optional[float] = None,
                        cross_attention_refresh: Optional[int] = None) -> InwardWindowHandle:
    """FreeSwim on a diffusers ``WanTransformer3DModel``: every self-attention (``attn1``) becomes
    inward window attention over the (frames, rows, cols) token grid.

    Args:
        window: window size in tokens per axis (T, H, W); -1 = the whole axis. FreeSwim uses the
            training-scale spatial extent and the full time axis, e.g. ``(-1, 31, 53)`` at 1088x1920
            from a 480x832 base. Inward border rule: the window keeps its size and shifts inside
            the grid near the borders.
        scale: softmax scale of the window attention (default 1/sqrt(d)).
        cross_attention_refresh: ``N`` enables the dual path: on every N-th step of a stream the
            transformer also runs a full-attention branch (batched with the window branch) whose
            cross-attention outputs (before ``to_out``) replace the window branch's and are cached
            per layer; the other steps reuse the cache and skip the cross-attention. Steps are
            counted per stream (per prompt-embedding tensor, so CFG's two calls per step count
            separately); ``handle.reset()`` starts a new generation.

    Returns a handle; ``dtk.adapters.remove(transformer)`` restores the original processors.
    """
    _check_wan(transformer)
    window = tuple(int(w) for w in window)
    if len(window) != 3 or any(w < 1 and w != -1 for w in window):
        raise ValueError(f"window must be 3 sizes (T, H, W), each >= 1 or -1, got {window!r}")
    if cross_attention_refresh is not None and (isinstance(cross_attention_refresh, bool)
                                                or not isinstance(cross_attention_refresh, int)
                                                or cross_attention_refresh < 1):
        raise ValueError(f"cross_attention_refresh must be None or an int >= 1, got {cross_attention_refresh!r}")
    handle = InwardWindowHandle(transformer, window, scale, cross_attention_refresh)
    ctx = handle.context
    for block in transformer.blocks:
        handle.set_processor(block.attn1, WanWindowAttnProcessor(ctx, window, scale, block.attn1.processor))
        if cross_attention_refresh is not None:
            proc = WanDualCrossAttnProcessor(ctx)
            handle.set_processor(block.attn2, proc)
            handle.cross_processors.append(proc)
    p_t, p_h, p_w = transformer.config.patch_size

    def pre(kw):
        hs = kw["hidden_states"]
        _, _, F, H, W = hs.shape
        ctx.grid = (F // p_t, H // p_h, W // p_w)
        ctx.batch = hs.shape[0]
        if cross_attention_refresh is None:
            ctx.mode = "window"
            return kw
        key = _stream_key(kw)
        if key not in handle._calls:
            handle._calls[key] = 0
        n = handle._calls[key]
        handle._calls[key] = n + 1
        refresh = n % cross_attention_refresh == 0 or any(key not in p.cache for p in handle.cross_processors)
        ctx.stream, ctx.mode = key, ("refresh" if refresh else "cached")
        handle.refresh_log.append((list(handle._calls).index(key), refresh))
        if refresh:
            for name in ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"):
                if kw.get(name) is not None:
                    kw[name] = torch.cat([kw[name], kw[name]], dim=0)
        return kw

    def post(kw, output):
        if ctx.mode != "refresh":
            return output
        return replace_output_sample(output, lambda x: x[: ctx.batch])

    handle.add_hooks(pre, post)
    handle._attach()
    return handle
