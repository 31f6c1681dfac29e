"""Wan adapters (``WanTransformer3DModel``), installed through diffusers' attention-processor API
plus forward hooks on the transformer:

* :func:`apply_inward_window` — FreeSwim: inward 3D window self-attention (``dtk.window_attention``),
  optionally with FreeSwim's dual path: a full-attention branch whose cross-attention output
  (before ``to_out``) replaces the window branch's, cached per layer and refreshed every N steps.
* :func:`apply_block_cache` — DualParal's building block: a long video is split into frame blocks
  (denoised in sequence, or in a pipeline over GPUs); every self-attention attends to the current
  block's K/V plus the previous block's K/V, taken per layer from a :class:`dtk.cache.KVCache`
  (``dtk.multi_kv_attention`` over the two segments, no concatenation). The cache holds the
  previous block's K/V *before* ``norm_k`` and RoPE, as DualParal stores them; the norm and RoPE are
  applied when read, with the previous block's frames placed right before the current block's.

The window processor's QK-norm (over all heads) and RoPE run as one ``dtk.rms_norm_rope`` pass per
q and k (diffusers normalises in float32 and rotates in float64, the tables' dtype).

The token grid (frames, rows, cols after patching) is read from the latent's shape on every
forward: any resolution or frame count works without re-applying and without host syncs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..cache import KVCache, OutputCache, RefreshPolicy
from ..ops.rotary import rms_norm_rope
from ..ops.layout import suggest_tile
from ..ops.window import window_attention
from ._common import (AdapterHandle, StreamNumbers, TensorMemo, TileOrder, check_diffusers, parse_tile,
                      replace_output_sample, rms_norm_eps, sdpa_bshd)

__all__ = ["apply_inward_window", "InwardWindowHandle", "WanWindowAttnProcessor", "WanDualCrossAttnProcessor",
           "apply_block_cache", "BlockCacheHandle", "WanBlockCacheAttnProcessor"]


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


def wan_rope_tables(rotary_emb) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Wan's (1, S, 1, D) cos / sin as dtk.rms_norm_rope's (S, D) float32 tables (WanAttnProcessor
    rotates pair i with cos[2i] and sin[2i + 1]; diffusers builds them in float64), or None when
    they are not in that form."""
    if not (isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2 and rotary_emb[0].dim() == 4):
        return None
    cos, sin = (t.reshape(t.shape[1], t.shape[-1]) for t in rotary_emb)
    return (cos[:, 0::2].float().repeat_interleave(2, -1).contiguous(),
            sin[:, 1::2].float().repeat_interleave(2, -1).contiguous())


def wan_self_qkv(attn, hidden_states, rotary_emb, tables=None):
    """q, k, v (B, S, H, D) of a Wan self-attention after QK-norm and RoPE. With `tables`
    (wan_rope_tables of rotary_emb) and plain RMS norms, each of q and k takes one
    dtk.rms_norm_rope pass (norm over all heads, then the rotation per head) instead of diffusers'
    float32 norm and float64 rotation."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    heads = lambda t: t.unflatten(2, (attn.heads, -1))  # noqa: E731
    if rotary_emb is not None and tables is not None:
        eps = [rms_norm_eps(n, q.shape[-1], q.dtype) for n in (attn.norm_q, attn.norm_k)]
        if None not in eps:
            q, k = (rms_norm_rope(heads(t), n.weight, *tables, eps=e, across_heads=True)
                    for t, n, e in ((q, attn.norm_q, eps[0]), (k, attn.norm_k, eps[1])))
            return q, k, heads(v)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = heads(q), heads(k), heads(v)
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

    def __init__(self, tile=None, window: Optional[Tuple[int, int, int]] = None):
        self.grid: Optional[Tuple[int, int, int]] = None
        self.batch: int = 0
        self.mode: str = "window"          # "window" | "refresh" | "cached"
        self.stream = None
        # the layout setting (None, a tile or "auto"); self.tile is the current forward's tile
        self.permutation = None if tile is None else TileOrder(tile, lambda grid: suggest_tile(grid, window))
        self.tile: Optional[Tuple[int, int, int]] = None if tile == "auto" else tile
        self._tables = TensorMemo()

    def rope_tables(self, rotary_emb):
        """wan_rope_tables of this forward's RoPE tables: made by the first layer, reused by the rest."""
        if rotary_emb is None:
            return None
        return self._tables.get(rotary_emb[0], lambda _: wan_rope_tables(rotary_emb), (id(rotary_emb[1]),))


class WanWindowAttnProcessor:
    """Inward 3D window self-attention for one Wan ``attn1``. In dual-path refresh calls the second
    half of the batch is the full-attention branch and runs the layer's original processor."""

    def __init__(self, ctx: WanContext, window: Tuple[int, int, int], scale: Optional[float], original):
        self.ctx, self.window, self.scale, self.original = ctx, window, scale, original

    def window_branch(self, attn, hidden_states, rotary_emb):
        q, k, v = wan_self_qkv(attn, hidden_states, rotary_emb, self.ctx.rope_tables(rotary_emb))
        out = window_attention(q, k, v, self.ctx.grid, self.window, border="inward", scale=self.scale,
                               tile=self.ctx.tile)
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
    """FreeSwim's cross-attention override for one Wan ``attn2`` (block ``layer``): on refresh calls
    the full branch's output before ``to_out`` replaces the window branch's and is written to the
    stream's ``dtk.cache.OutputCache``; on the other calls it is read from there and the
    cross-attention is not computed at all."""

    def __init__(self, ctx: WanContext, layer: int):
        self.ctx, self.layer = ctx, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        ctx = self.ctx
        if ctx.mode == "refresh":
            B = ctx.batch
            full = wan_cross_pre_out(attn, hidden_states[B:], encoder_hidden_states[B:])
            ctx.stream.write(self.layer, full)
            pre = torch.cat([full, full], dim=0)
        elif ctx.mode == "cached":
            pre = ctx.stream.read(self.layer)      # same shape: the stream key holds the latent shape
        else:
            pre = wan_cross_pre_out(attn, hidden_states, encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](pre))


class InwardWindowHandle(AdapterHandle):
    kind = "FreeSwim inward window"

    def __init__(self, model, window, scale, refresh, tile):
        super().__init__(model)
        self.window, self.scale, self.cross_attention_refresh = window, scale, refresh
        self.context = WanContext(tile, window)
        self.cross_processors: List[WanDualCrossAttnProcessor] = []
        self.streams: Dict[tuple, OutputCache] = {}     # per stream: step count and per-layer outputs
        self.refresh_log: List[Tuple[int, bool]] = []    # (stream number, refreshed?) per forward
        self.stream_numbers = StreamNumbers(self.streams)   # a freed prompt drops its streams

    def stream_key(self, kw) -> tuple:
        """The stream of a call: its prompt-embedding tensors (the same objects at every step of a
        generation, one per CFG branch) and the latent shape; no host sync."""
        img = kw.get("encoder_hidden_states_image")
        return (self.stream_numbers(kw["encoder_hidden_states"]), None if img is None else self.stream_numbers(img),
                tuple(kw["hidden_states"].shape), kw["hidden_states"].dtype)

    def reset(self) -> None:
        """Drops the cached cross-attention outputs and step counters (start of a new video)."""
        self.streams.clear()
        self.refresh_log.clear()


def apply_inward_window(transformer, window: Sequence[int] = (-1, 31, 53), *, scale: Optional[float] = None,
                        cross_attention_refresh: Optional[int] = None,
                        tile=None) -> InwardWindowHandle:
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
        tile: ``(tt, th, tw)``: the tokens are permuted into tile order once per forward (the patch
            embedding's tokens, the RoPE tables and a per-token timestep in; the projected output
            back), so every layer runs on tile-ordered tokens: the window kernel computes fewer
            wasted pairs. Same result as row-major. ``"auto"`` (recommended): ``dtk.suggest_tile``
            picks the tile for each new grid, e.g. ``(21, 3, 2)`` at 1080p (the whole time axis is in
            every window): 0.88 of the computed pairs are needed there, against 0.59 for ``(7, 2, 8)``.

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
    tile = parse_tile(tile, 3)
    handle = InwardWindowHandle(transformer, window, scale, cross_attention_refresh, tile)
    ctx = handle.context
    for block in transformer.blocks:
        handle.set_processor(block.attn1, WanWindowAttnProcessor(ctx, window, scale, block.attn1.processor))
        if cross_attention_refresh is not None:
            proc = WanDualCrossAttnProcessor(ctx, len(handle.cross_processors))
            handle.set_processor(block.attn2, proc)
            handle.cross_processors.append(proc)
    p_t, p_h, p_w = transformer.config.patch_size

    def pre(kw):
        hs = kw["hidden_states"]
        _, _, F, H, W = hs.shape
        ctx.grid = (F // p_t, H // p_h, W // p_w)
        ctx.batch = hs.shape[0]
        if ctx.permutation is not None:
            ctx.tile = ctx.permutation.tile(ctx.grid)
        ts = kw.get("timestep")
        if ctx.tile is not None and ts is not None and ts.ndim == 2:   # per-token timesteps (Wan 2.2 TI2V)
            kw["timestep"] = ts[:, ctx.permutation(ctx.grid, ts.device)[0]]
        if cross_attention_refresh is None:
            ctx.mode = "window"
            return kw
        key = handle.stream_key(kw)
        if key not in handle.streams:
            handle.streams[key] = OutputCache(RefreshPolicy(every=cross_attention_refresh))
        cache = handle.streams[key]
        refresh = cache.should_write() or len(cache) < len(handle.cross_processors)
        cache.next_step()
        ctx.stream, ctx.mode = cache, ("refresh" if refresh else "cached")
        handle.refresh_log.append((list(handle.streams).index(key), refresh))
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
    if tile is not None:
        _tile_order_hooks(handle, transformer, ctx)
    handle._attach()
    return handle


def _tile_order_hooks(handle: AdapterHandle, transformer, ctx: WanContext) -> None:
    """Tokens into tile order where the forward makes them and back where it unpatchifies: the
    patch embedding's output (B, C, T, H, W) becomes (B, C, 1, 1, S) in tile order, so the
    forward's flatten yields tile-ordered tokens; the RoPE tables (1, S, 1, D) follow; proj_out's
    (B, S, C) output returns to row-major before the unpatchify reshape."""

    def perm(device):
        return ctx.permutation(ctx.grid, device)

    def tokens_in(x):
        return x if ctx.tile is None else x.flatten(2)[:, :, perm(x.device)[0]].unflatten(2, (1, 1, -1))

    def rope_in(tables):
        return tables if ctx.tile is None else tuple(t[:, perm(t.device)[0]] for t in tables)

    def tokens_out(x):
        return x if ctx.tile is None else x[:, perm(x.device)[1]]

    handle.add_output_hook(transformer.patch_embedding, tokens_in)
    handle.add_output_hook(transformer.rope, rope_in)
    handle.add_output_hook(transformer.proj_out, tokens_out)


# ------------------------------------------------------------------------------------------------
# DualParal: attention over the current frame block's K/V plus the previous block's cached K/V.

def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself when it owns its whole storage, else a compact copy (a kept slice or a chunk of a
    fused projection must not pin the full tensor it views)."""
    if t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone() if t.is_contiguous() else t.contiguous()


class BlockCacheContext:
    """Per-forward state of a DualParal-adapted Wan transformer: the token grid and the RoPE tables
    of [previous frames, current frames] (built once per forward per previous-block length)."""

    def __init__(self, model):
        self.model = model
        self.grid: Optional[Tuple[int, int, int]] = None
        self.batch = 0
        self._rope: Dict[int, Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = {}

    def start(self, hidden_states: torch.Tensor) -> None:
        p_t, p_h, p_w = self.model.config.patch_size
        _, _, F, H, W = hidden_states.shape
        self.grid = (F // p_t, H // p_h, W // p_w)
        self.batch = hidden_states.shape[0]
        self._rope.clear()

    def rope_pair(self, prev_frames: int):
        """((cos, sin) of the previous block's P frames at time positions 0..P-1, (cos, sin) of the
        current block's F frames at P..P+F-1), from the model's own rotary module: RoPE is relative,
        so this equals placing the previous frames at -P..-1 before an unshifted current block."""
        if prev_frames not in self._rope:
            F, H, W = self.grid
            p_t, p_h, p_w = self.model.config.patch_size
            # WanRotaryPosEmbed reads only the latent's shape: a meta tensor of the joint shape.
            shape = torch.empty((1, 0, (prev_frames + F) * p_t, H * p_h, W * p_w), device="meta")
            cos, sin = self.model.rope(shape)
            n = prev_frames * H * W
            self._rope[prev_frames] = ((cos[:, :n], sin[:, :n]), (cos[:, n:], sin[:, n:]))
        return self._rope[prev_frames]


class WanBlockCacheAttnProcessor:
    """DualParal self-attention for one Wan ``attn1`` (layer ``layer``): writes this forward's
    pre-norm K/V (the last ``keep_frames`` frames) to the handle's staged cache and, when the
    handle's cache holds the previous block's K/V for (stream, layer), attends over
    [norm_k + RoPE(previous K), current K] with ``dtk.multi_kv_attention``."""

    def __init__(self, handle: "BlockCacheHandle", layer: int):
        self.handle, self.layer = handle, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("dtk Wan DualParal processor: attention_mask is not supported")
        if encoder_hidden_states is not None:
            raise NotImplementedError("dtk Wan DualParal processor: only self-attention (attn1) is supported")
        import dtk
        h, ctx = self.handle, self.handle.context
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        F, Hh, Ww = ctx.grid
        key = (h.stream, self.layer)
        if h.record:
            keep = F if h.keep_frames is None else min(h.keep_frames, F)
            n = keep * Hh * Ww
            h.staged.write(key, _own_storage(k[:, k.shape[1] - n:]), _own_storage(v[:, v.shape[1] - n:]))
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        if key in h.cache:
            kp, vp = h.cache.read(key)
            if kp.shape[0] != q.shape[0] or kp.shape[2] != k.shape[2] * k.shape[3] or \
                    kp.shape[1] % (Hh * Ww) != 0 or vp.shape != kp.shape:
                raise RuntimeError(
                    f"dtk DualParal: layer {self.layer} has cached K/V of shape {tuple(kp.shape)} that does not fit "
                    f"this block (batch {q.shape[0]}, grid {ctx.grid}, {k.shape[2] * k.shape[3]} channels); "
                    "call handle.reset() between videos")
            P = kp.shape[1] // (Hh * Ww)
            rope_prev, rope_cur = ctx.rope_pair(P)
            kp = attn.norm_k(kp.to(k.dtype)).unflatten(2, (attn.heads, -1))
            vp = vp.to(v.dtype).unflatten(2, (attn.heads, -1))
            q, k, kp = wan_rope(q, *rope_cur), wan_rope(k, *rope_cur), wan_rope(kp, *rope_prev)
            out = dtk.multi_kv_attention(q, [kp, k], [vp, v], scale=h.scale)
        else:
            if rotary_emb is not None:
                q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
            out = dtk.multi_kv_attention(q, [k], [v], scale=h.scale)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class BlockCacheHandle(AdapterHandle):
    """State of one DualParal-adapted Wan transformer.

    Attributes:
        cache: :class:`dtk.cache.KVCache` with the *previous* block's pre-norm, pre-RoPE K/V,
            keyed ``(stream, layer)``; read by every forward (empty = first block: plain attention).
            ``cache.nbytes`` / ``cache.nbytes_on(dev)`` account its memory. Its refresh policy is
            not consulted: entries change only through :meth:`next_block` / :meth:`import_cache`.
        staged: KVCache with the *current* block's pre-norm K/V, overwritten by every forward
            (``record=True``); the last forward of a (stream, layer) wins.
        stream: key of the current call's stream (default None). With classifier-free guidance run
            as two calls per step, set ``handle.stream = "cond"`` / ``"uncond"`` before each so the
            branches keep separate caches (or batch them: the batch is part of the cached tensors).
        record: False skips the staging writes (e.g. the last block, or steps whose K/V should not
            be handed on).
        keep_frames: how many of the block's last latent frames (after patching) are staged for the
            next block (None = all).
        blocks_done: how many times :meth:`next_block` ran since the last reset.
    """

    kind = "DualParal block cache"

    def __init__(self, model, cache, keep_frames, scale):
        super().__init__(model)
        self.cache = cache if cache is not None else KVCache()
        self.staged = KVCache(offload=self.cache.offload, offload_device=str(self.cache.offload_device))
        self.keep_frames, self.scale = keep_frames, scale
        self.context = BlockCacheContext(model)
        self.stream = None
        self.record = True
        self.blocks_done = 0

    def export_cache(self) -> Dict[Tuple[object, int], Tuple[torch.Tensor, torch.Tensor]]:
        """The current block's staged pre-norm K/V, ``{(stream, layer): (k, v)}`` with k, v of shape
        (B, keep_frames*H*W, heads*head_dim): what the next block needs. The tensors are the staged
        ones (device copies when offloaded); the staged cache is not cleared."""
        return {key: self.staged.read(key) for key in self.staged.layers()}

    def import_cache(self, entries) -> None:
        """Makes ``entries`` (``{(stream, layer): (k, v)}``, as :meth:`export_cache` returns, e.g.
        received from the GPU of the previous block) the previous block's K/V; the old entries go."""
        for key in self.cache.layers():
            self.cache.drop(key)
        for key, (k, v) in entries.items():
            self.cache.write(key, k, v)

    def next_block(self) -> None:
        """Single-process driver: the block just computed becomes the previous block (staged K/V
        move to ``cache``); call it between blocks, after the block's last denoising forward."""
        self.import_cache(self.export_cache())
        self.staged.reset()
        self.blocks_done += 1

    def reset(self) -> None:
        """Empties both caches (start of a new video: the next forward is a first block)."""
        self.cache.reset()
        self.staged.reset()
        self.blocks_done = 0


def apply_block_cache(transformer, *, cache=None, keep_frames: Optional[int] = None,
                      scale: Optional[float] = None) -> BlockCacheHandle:
    """DualParal's building block on a diffusers ``WanTransformer3DModel``: each self-attention
    (``attn1``) attends over the current frame block's tokens plus the previous block's cached K/V.

    DualParal splits a long video's latent into blocks of frames, denoised one after another (or
    pipelined over GPUs, block i on GPU i). Here a forward on a block:

    * projects K/V as usual and stages the pre-``norm_k``, pre-RoPE K and V (the last
      ``keep_frames`` frames) in ``handle.staged`` for the next block;
    * if ``handle.cache`` holds the previous block's K/V for this (stream, layer), applies the
      layer's ``norm_k`` to them and RoPE with time positions just before the current block's
      (positions of [previous P frames, current F frames] = 0..P+F-1, split), and attends with
      ``dtk.multi_kv_attention(q, [k_prev, k], [v_prev, v])`` — queries are the current tokens only
      (Lq = F*H*W, Lk = (P+F)*H*W). Without an entry (the first block) it is Wan's own attention.

    ``handle.next_block()`` moves the staged K/V into the cache (single process). A multi-GPU driver
    instead sends ``handle.export_cache()``'s tensors to the next block's rank (torch.distributed
    ``send``/``isend`` per tensor, in the dict's (stream, layer) order; shapes are (B, P*H*W, C)
    in the model dtype, known to the receiver from the block geometry) and there calls
    ``handle.import_cache({key: (k, v)})``; the adapter itself does no communication.
    Cross-attention and the rest of the block are untouched; H and W (and the batch) must match
    between consecutive blocks.

    Args:
        cache: the :class:`dtk.cache.KVCache` for the previous block's K/V (e.g. ``offload=True`` to
            keep it in CPU memory; the staged cache follows its offload setting). Default: a new one.
        keep_frames: latent frames (after patching) of a block handed to the next block, counted
            from its end (None = the whole block).
        scale: softmax scale (default 1/sqrt(head_dim)).

    Returns a :class:`BlockCacheHandle`; ``dtk.adapters.remove(transformer)`` restores the original
    processors and drops the caches.
    """
    _check_wan(transformer)
    import dtk
    if not hasattr(dtk, "multi_kv_attention") or not hasattr(dtk, "cache"):
        raise RuntimeError("this dtk build lacks dtk.multi_kv_attention / dtk.cache")
    if keep_frames is not None and (isinstance(keep_frames, bool) or not isinstance(keep_frames, int)
                                    or keep_frames < 1):
        raise ValueError(f"keep_frames must be None or an int >= 1, got {keep_frames!r}")
    if cache is not None and not isinstance(cache, dtk.cache.KVCache):
        raise TypeError(f"cache must be a dtk.cache.KVCache, got {type(cache).__name__}")
    handle = BlockCacheHandle(transformer, cache, keep_frames, scale)
    for i, block in enumerate(transformer.blocks):
        handle.set_processor(block.attn1, WanBlockCacheAttnProcessor(handle, i))

    def pre(kw):
        handle.context.start(kw["hidden_states"])
        return kw

    handle.add_hooks(pre)
    handle._attach()
    return handle
