"""FLUX adapters (``FluxTransformer2DModel``, joint and single blocks), installed through diffusers'
attention-processor API plus forward hooks on the transformer (no forward is monkey-patched):

* :func:`apply_local_attention` — CLEAR: circle window on the image grid, clipped borders, text
  tokens global; optional pooled keys (``downsample``), proportional scale and tile order.
* :func:`load_clear_weights` — CLEAR's released checkpoints.

Every FLUX processor here computes q, k, v with ``flux_qkv``: diffusers' projections, then the
QK-norm and RoPE as one ``dtk.rms_norm_rope`` pass per part (diffusers' composition of the two is
about a dozen elementwise passes over q and k, several in float32: at 4096^2 more memory traffic
per layer than the window attention's own; ``python -m benchmarks.glue_bytes``).

The image grid is read from ``img_ids`` once per forward (cached while the same ids tensor is
passed again, so a denoising loop syncs with the host once), so any resolution works without
re-applying. ``dtk.adapters.remove(transformer)`` restores the original processors and weights.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..ops.rotary import rms_norm_rope
from ..ops.layout import suggest_tile
from ..ops.window import pool_grid_tokens, window_attention
from ._common import (AdapterHandle, StreamNumbers, TensorMemo, TileOrder, check_diffusers, get_handle, parse_tile,
                      replace_output_sample, rms_norm_eps)

__all__ = ["apply_local_attention", "load_clear_weights", "LocalAttentionHandle", "FluxLocalAttnProcessor"]

CLEAR_TRAIN_SEQ_LEN = 64 ** 2 + 512      # 4608: FLUX at 1024^2 with 512 text tokens


# ------------------------------------------------------------------------------------------------
# Shared FLUX glue: projections, RoPE, output projections; the grid read from img_ids.

def _norm_rope(norm, x, rope, rows):
    """norm(x) then diffusers' apply_rotary_emb with the `rows` slice of the (cos, sin) tables
    `rope` (None: no rotation), as one dtk.rms_norm_rope pass when the norm is a plain RMS norm:
    the composition is about a dozen elementwise passes over x, several in float32."""
    from diffusers.models.embeddings import apply_rotary_emb
    tables = None
    if rope is not None:
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2 and rope[0].dim() == 2):
            return apply_rotary_emb(norm(x), rope, sequence_dim=1)
        tables = tuple(t[rows] for t in rope)
    eps = rms_norm_eps(norm, x.shape[-1], x.dtype)
    if eps is not None:
        return rms_norm_rope(x, norm.weight, *(tables or (None, None)), eps=eps)
    x = norm(x)
    return x if tables is None or x.shape[1] == 0 else apply_rotary_emb(x, tables, sequence_dim=1)


def flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """q, k, v (B, S, H, D) after QK-norm and RoPE, text first (joint blocks), as FluxAttnProcessor
    (which rotates after concatenating text and image; rotating each part with its rows of the
    tables is the same)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    unflat = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    P = encoder_hidden_states.shape[1] if joint else 0
    query = _norm_rope(attn.norm_q, unflat(query), image_rotary_emb, slice(P, None))
    key = _norm_rope(attn.norm_k, unflat(key), image_rotary_emb, slice(P, None))
    value = unflat(value)
    if joint:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
        eq = _norm_rope(attn.norm_added_q, unflat(eq), image_rotary_emb, slice(0, P))
        ek = _norm_rope(attn.norm_added_k, unflat(ek), image_rotary_emb, slice(0, P))
        query = torch.cat([eq, query], dim=1)
        key = torch.cat([ek, key], dim=1)
        value = torch.cat([unflat(ev), value], dim=1)
    return query, key, value


def flux_out(attn, out, encoder_hidden_states):
    """(B, S, H, D) attention output -> the block's outputs, as FluxAttnProcessor."""
    out = out.flatten(2, 3)
    if encoder_hidden_states is None:
        return out
    n_text = encoder_hidden_states.shape[1]
    enc, img = out[:, :n_text], out[:, n_text:]
    img = attn.to_out[1](attn.to_out[0](img.contiguous()))
    enc = attn.to_add_out(enc.contiguous())
    return img, enc


def iter_flux_attention(transformer):
    """(name, FluxAttention) of every joint and single block, in order."""
    for i, block in enumerate(transformer.transformer_blocks):
        yield f"transformer_blocks.{i}.attn", block.attn
    for i, block in enumerate(transformer.single_transformer_blocks):
        yield f"single_transformer_blocks.{i}.attn", block.attn


def _check_flux(transformer):
    check_diffusers()
    from diffusers import FluxTransformer2DModel
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(f"expected a diffusers FluxTransformer2DModel, got {type(transformer).__name__}")


def _ids_2d(img_ids: torch.Tensor) -> torch.Tensor:
    return img_ids[0] if img_ids.ndim == 3 else img_ids


def _image_grid(ids: torch.Tensor) -> Tuple[int, int]:
    """(H, W) of row-major image ids (FluxPipeline's layout: ids[:, 1] = row, ids[:, 2] = col)."""
    n = ids.shape[0]
    rows, cols = ids[:, 1], ids[:, 2]
    h0, w0, h1, w1 = (int(v) for v in torch.stack([rows.amin(), cols.amin(), rows.amax(), cols.amax()]).tolist())
    H, W = h1 - h0 + 1, w1 - w0 + 1
    ok = H * W == n
    if ok:
        r = torch.arange(n, device=ids.device)
        ok = bool(((rows - h0) == (r // W).to(rows.dtype)).all() & ((cols - w0) == (r % W).to(cols.dtype)).all())
    if not ok:
        raise ValueError(f"dtk FLUX adapter: img_ids ({n} tokens, rows {h0}..{h1}, cols {w0}..{w1}) are not a "
                         "row-major image grid; local attention needs FluxPipeline's image ids")
    return H, W


class FluxGridContext:
    """Per-model state shared by the processors of one adapted transformer: the image grid of the
    current forward and the tile layout."""

    def __init__(self, tile=None, radius: Optional[int] = None):
        # the layout setting (None, a tile or "auto"); self.tile is the current forward's tile
        self.permutation = None if tile is None else TileOrder(tile, lambda grid: suggest_tile(grid, radius=radius))
        self.tile: Optional[Tuple[int, int]] = None if tile == "auto" else tile
        self.grid: Optional[Tuple[int, int]] = None
        self._memo = TensorMemo()

    def grid_from_ids(self, img_ids: torch.Tensor, lo: int = 0, hi: Optional[int] = None) -> Tuple[int, int]:
        """(H, W) of the image ids rows [lo, hi) of `img_ids` as the pipeline passes them ((S, 3) or
        (B, S, 3)). One host sync per new ids tensor; reused while the pipeline passes the same one."""
        self.grid = self._memo.get(img_ids, lambda t: _image_grid(_ids_2d(t)[lo:hi]), (lo, hi))
        return self.grid


def _grid_hooks(handle: AdapterHandle, ctx: FluxGridContext):
    """Pre-hook: reads the grid; with a tile, permutes the image tokens, their ids and ControlNet
    residuals into tile order. Post-hook: the prediction back to row-major."""

    def pre(kw):
        ids = kw.get("img_ids")
        if ids is None:
            raise ValueError("dtk FLUX adapter: the transformer must be called with img_ids")
        ids2 = _ids_2d(ids)
        grid = ctx.grid_from_ids(ids)
        if ctx.permutation is not None:
            ctx.tile = ctx.permutation.tile(grid)
        if ctx.tile is not None:
            perm, _ = ctx.permutation(grid, ids2.device)
            kw["hidden_states"] = kw["hidden_states"][:, perm]
            kw["img_ids"] = ids2[perm]
            for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
                if kw.get(name) is not None:
                    kw[name] = [s[:, perm] for s in kw[name]]
        return kw

    def post(kw, output):
        if ctx.tile is None:
            return output
        _, inv = ctx.permutation(ctx.grid, kw["hidden_states"].device)
        return replace_output_sample(output, lambda x: x[:, inv])

    handle.add_hooks(pre, post if ctx.permutation is not None else None)


# ------------------------------------------------------------------------------------------------
# CLEAR

class FluxLocalAttnProcessor(torch.nn.Module):
    """CLEAR's local attention for one FLUX attention layer (joint or single block).

    Image queries see the image keys inside a circle of ``radius`` (``dy^2 + dx^2 < r^2``, border
    clipped), all text keys and, with ``downsample``, the pooled image keys; text queries see
    everything except the pooled keys. ``spatial_weight`` (CLEAR's name and shape) holds the
    pooling weights."""

    def __init__(self, ctx: FluxGridContext, radius: int, downsample: Optional[int] = None,
                 proportional_scale: bool = False):
        super().__init__()
        self.ctx = ctx
        self.radius = int(radius)
        self.downsample = downsample
        self.proportional_scale = proportional_scale
        if downsample:
            self.spatial_weight = torch.nn.Parameter(
                torch.full((1, 1, 1, downsample, 1, downsample, 1), 1.0 / (downsample * downsample)))

    def scale(self, seq_len: int, head_dim: int) -> Optional[float]:
        if not self.proportional_scale:
            return None
        # CLEAR's proportional attention: sqrt(log_4608(N_kv) / d); its downsample variant uses 10 * N_kv.
        n = seq_len * (10 if self.downsample else 1)
        return math.sqrt(math.log(n, CLEAR_TRAIN_SEQ_LEN) / head_dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("dtk CLEAR processor: attention_mask is not supported")
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        grid = self.ctx.grid
        S = q.shape[1]
        P = S - grid[0] * grid[1]
        if P < 0 or (encoder_hidden_states is not None and P != encoder_hidden_states.shape[1]):
            raise ValueError(f"dtk CLEAR processor: {S} tokens do not hold the {grid[0]}x{grid[1]} image grid "
                             f"after the text tokens")
        extra_k = extra_v = None
        if self.downsample:
            extra_k = pool_grid_tokens(k, grid, self.downsample, self.spatial_weight, num_prefix=P, tile=self.ctx.tile)
            extra_v = pool_grid_tokens(v, grid, self.downsample, self.spatial_weight, num_prefix=P, tile=self.ctx.tile)
            if extra_k.shape[1] == 0:
                extra_k = extra_v = None
        out = window_attention(q, k, v, grid, radius=self.radius, border="clip", num_prefix=P, tile=self.ctx.tile,
                               scale=self.scale(S, q.shape[-1]), extra_k=extra_k, extra_v=extra_v)
        return flux_out(attn, out.to(q.dtype), encoder_hidden_states)

    def extra_repr(self):
        return f"radius={self.radius}, downsample={self.downsample}, proportional_scale={self.proportional_scale}"


class LocalAttentionHandle(AdapterHandle):
    kind = "CLEAR local attention"

    def __init__(self, model, radius, downsample, proportional_scale, tile):
        super().__init__(model)
        self.radius, self.downsample, self.proportional_scale, self.tile = radius, downsample, proportional_scale, tile
        self.context = FluxGridContext(tile, radius)
        self.processors: Dict[str, FluxLocalAttnProcessor] = {}


def apply_local_attention(transformer, radius: int = 16, *, downsample: Optional[int] = None,
                          proportional_scale: bool = False,
                          tile: Optional[Union[int, Sequence[int], str]] = None) -> LocalAttentionHandle:
    """CLEAR on a diffusers ``FluxTransformer2DModel``: every attention layer (19 joint + 38 single
    blocks in FLUX.1) becomes local attention on the image grid via ``dtk.window_attention``.

    Args:
        radius: circle radius in tokens (CLEAR uses 8, 16, 32); image query (y, x) sees image key
            (y', x') iff ``(y-y')^2 + (x-x')^2 < radius^2``, clipped at the borders. Text tokens
            attend to and are attended by every token.
        downsample: ``df`` adds CLEAR's pooled keys/values: the image K/V pooled over df x df
            patches with learnable per-position weights (``spatial_weight``, initialised to
            1/df^2), seen by the image queries only.
        proportional_scale: softmax scale ``sqrt(log_4608(N) / d)`` (CLEAR's proportional
            attention for resolutions above the training one) instead of ``1/sqrt(d)``; N is the
            sequence length (text + image tokens), or 10 x that with ``downsample``, as in CLEAR's
            released processor.
        tile: ``(th, tw)``: the image tokens are permuted into tile order once per forward (input
            tokens, RoPE ids and ControlNet residuals in; the prediction out), so every layer runs
            on tile-ordered tokens (faster window kernels). Same result as row-major. ``"auto"``:
            ``dtk.suggest_tile`` picks the tile for each new grid ((8, 16) for r = 16).

    Returns a handle; ``dtk.adapters.remove(transformer)`` restores the original processors.
    """
    _check_flux(transformer)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an int >= 1, got {radius!r}")
    if downsample is not None and (isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1):
        raise ValueError(f"downsample must be None or an int >= 1, got {downsample!r}")
    tile = parse_tile(tile, 2)
    handle = LocalAttentionHandle(transformer, radius, downsample, proportional_scale, tile)
    ref = next(transformer.parameters())
    for name, attn in iter_flux_attention(transformer):
        proc = FluxLocalAttnProcessor(handle.context, radius, downsample, proportional_scale).to(ref.device)
        if downsample:
            proc.to(ref.dtype)
        handle.set_processor(attn, proc)
        handle.processors[name] = proc
    _grid_hooks(handle, handle.context)
    handle._attach()
    return handle


_CLEAR_PARAM_PARTS = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")


def load_clear_weights(transformer, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True):
    """Loads a checkpoint in CLEAR's released layout into a transformer adapted with
    :func:`apply_local_attention`: the image-branch ``...attn.to_q/to_k/to_v/to_out.*`` weights of
    every block and, for downsample checkpoints, ``...attn.processor.spatial_weight`` (keys may carry
    a ``transformer.`` prefix). The replaced base weights are kept (on the CPU) so
    ``dtk.adapters.remove`` restores them.

    With ``strict`` (default) a checkpoint that misses keys the adapter expects, or has keys it does
    not know, raises a ``KeyError`` listing both; otherwise returns ``(missing, unexpected)``.
    """
    handle = get_handle(transformer)
    if not isinstance(handle, LocalAttentionHandle):
        raise RuntimeError("load_clear_weights: apply dtk.adapters.flux.apply_local_attention(transformer, ...) first")
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in state_dict.items()}
    targets = dict(transformer.named_parameters())
    expected = {n for n in targets if any(p in n for p in _CLEAR_PARAM_PARTS) and ".processor." not in n}
    if handle.downsample:
        expected |= {n for n in targets if n.endswith(".processor.spatial_weight")}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(k for k in sd if k not in expected)
    if strict and (missing or unexpected):
        raise KeyError("load_clear_weights: checkpoint does not match the adapted transformer"
                       f" (radius={handle.radius}, downsample={handle.downsample}).\n"
                       f"  missing keys ({len(missing)}): {_short(missing)}\n"
                       f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    with torch.no_grad():
        for name in sorted(expected & sd.keys()):
            p, value = targets[name], sd[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"load_clear_weights: {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            if ".processor." not in name:
                handle.backup_parameter(name, p)
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    return missing, unexpected


def _short(keys, n=8):
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") if keys else "none"


# ------------------------------------------------------------------------------------------------
# Condition reuse (OminiControl2 / FLUX Kontext) and SpotEdit: need the sparse/cache ops.

def _sparse_ops():
    import dtk
    missing = [n for n in ("multi_kv_attention", "segment_attention", "ominicontrol_group_mask",
                           "scatter_blend", "token_change_score", "mask_to_index") if not hasattr(dtk, n)]
    if missing or not hasattr(dtk, "cache"):
        raise RuntimeError(f"this dtk build lacks the sparse/cache ops ({', '.join(missing) or 'dtk.cache'})")
    return dtk


def _condition_count(ids: torch.Tensor) -> int:
    cond = ids[:, 0] != 0
    m, first = torch.stack([cond.sum(), cond.int().argmax()]).tolist()
    if m and first != ids.shape[0] - m:
        raise ValueError("dtk FLUX condition adapters: condition tokens (img_ids[:, 0] != 0) must follow "
                         "the noisy tokens")
    return int(m)


class ConditionContext:
    """Per-model state of condition reuse / SpotEdit: this forward's layout (text T, noisy N,
    condition M tokens), mode and the stream's caches."""

    def __init__(self):
        self.mode = "full"
        self.T = self.N = self.M = 0
        self.stream = None
        self._memo = TensorMemo()

    def split_from_ids(self, img_ids: torch.Tensor, num_condition: Optional[int]) -> int:
        """Number of condition tokens: given, or the trailing image tokens with ids[:, 0] != 0
        (FLUX Kontext marks its condition image with 1) of `img_ids` as the pipeline passes them.
        One host sync per new ids tensor."""
        if num_condition is not None:
            return int(num_condition)
        return self._memo.get(img_ids, lambda t: _condition_count(_ids_2d(t)))


class _CondStream:
    def __init__(self, dtk, policy):
        self.cache = dtk.cache.KVCache(policy=policy)
        self.step = 0


class FluxConditionReuseProcessor:
    """Condition reuse for one FLUX attention layer. On write steps the sequence is
    [text, noisy, condition] under OminiControl's asymmetric mask (condition tokens see only
    themselves; ``dtk.segment_attention``) and the condition tokens' post-RoPE K/V are cached; on
    read steps the condition tokens are absent and [text, noisy] attend over their own and the
    cached K/V (``dtk.multi_kv_attention``)."""

    def __init__(self, ctx: ConditionContext, name: str):
        self.ctx, self.name = ctx, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        import dtk
        ctx = self.ctx
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        cache = ctx.stream.cache
        if ctx.mode == "write":
            out = dtk.segment_attention(q, k, v, ctx.cu_seqlens, ctx.group_mask)
            s = ctx.T + ctx.N
            cache.write(self.name, k[:, s:], v[:, s:])
        else:
            kc, vc = cache.read(self.name)
            out = dtk.multi_kv_attention(q, [k, kc], [v, vc])
        return flux_out(attn, out.to(q.dtype), encoder_hidden_states)


class ConditionReuseHandle(AdapterHandle):
    kind = "condition reuse"

    def __init__(self, model, refresh_every, num_condition_tokens):
        super().__init__(model)
        self.refresh_every, self.num_condition_tokens = refresh_every, num_condition_tokens
        self.context = ConditionContext()
        self.streams: Dict[tuple, _CondStream] = {}    # per (prompt tensor, latent shape)
        self.stream_numbers = StreamNumbers(self.streams)
        self.log = []                   # (stream number, "write" | "read") per forward

    def reset(self):
        """Drops the cached condition K/V and step counters (start of a new generation)."""
        self.streams.clear()
        self.log.clear()


def apply_condition_reuse(transformer, *, refresh_every: Optional[int] = None,
                          num_condition_tokens: Optional[int] = None) -> ConditionReuseHandle:
    """OminiControl2-style condition reuse on a FLUX transformer whose image sequence is
    [noisy tokens, condition tokens] (FLUX Kontext, OminiControl with ids[:, 0] != 0 marking the
    condition; or give ``num_condition_tokens``).

    Write steps (the first step of a stream, then every ``refresh_every`` steps; ``None`` = only the
    first): condition tokens attend only to themselves (asymmetric mask), their post-RoPE K/V are
    cached per layer. Read steps: the pre-hook drops the condition tokens from the input (the
    transformer runs on text + noisy tokens only) and every layer attends over its own K/V plus
    the cached condition K/V. The prediction keeps the input's length (condition rows are zero
    on read steps; pipelines keep only the noisy rows). Steps are counted per stream (per
    prompt-embedding tensor); ``handle.reset()`` starts a new generation.
    """
    _check_flux(transformer)
    dtk = _sparse_ops()
    if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
        raise ValueError(f"refresh_every must be None or an int >= 1, got {refresh_every!r}")
    handle = ConditionReuseHandle(transformer, refresh_every, num_condition_tokens)
    ctx = handle.context
    for name, attn in iter_flux_attention(transformer):
        handle.set_processor(attn, FluxConditionReuseProcessor(ctx, name))
    policy = dtk.cache.RefreshPolicy(every=refresh_every)

    def pre(kw):
        hs = kw["hidden_states"]
        M = ctx.split_from_ids(kw["img_ids"], num_condition_tokens)
        ctx.T, ctx.M, ctx.N = kw["encoder_hidden_states"].shape[1], M, hs.shape[1] - M
        key = (handle.stream_numbers(kw["encoder_hidden_states"]), tuple(hs.shape))
        if key not in handle.streams:
            handle.streams[key] = _CondStream(dtk, policy)
        st = ctx.stream = handle.streams[key]
        st.cache.set_step(st.step)
        write = M == 0 or st.cache.should_write(layer=None) or len(st.cache) == 0
        ctx.mode = "write" if write else "read"
        handle.log.append((list(handle.streams).index(key), ctx.mode))
        if write:   # the branch layout on the host: read by the cuDNN engine without a device sync
            ctx.cu_seqlens = torch.tensor([0, ctx.T, ctx.T + ctx.N, ctx.T + ctx.N + M], dtype=torch.int32)
            ctx.group_mask = dtk.ominicontrol_group_mask(1)
        else:
            kw["hidden_states"] = hs[:, :ctx.N]
            kw["img_ids"] = _ids_2d(kw["img_ids"])[:ctx.N]
        return kw

    def post(kw, output):
        ctx.stream.step += 1
        if ctx.mode != "read":
            return output
        return replace_output_sample(output, lambda x: torch.cat([x, x.new_zeros(x.shape[0], ctx.M, x.shape[2])], 1))

    handle.add_hooks(pre, post)
    handle._attach()
    return handle


class _SpotStream:
    def __init__(self):
        self.step = 0
        self.layers: Dict[str, Dict[str, torch.Tensor]] = {}   # per layer: noisy and condition K/V
        self.prev: Optional[torch.Tensor] = None                 # (B, N, C) last prediction of the noisy tokens
        self.index: Optional[torch.Tensor] = None                # (N,) int32 edited tokens, -1 padded (device)
        self.count: Optional[torch.Tensor] = None                # () int32 number of edited tokens (device)


class FluxSpotEditProcessor:
    """SpotEdit for one FLUX attention layer. Full steps: dense attention over
    [text, noisy, condition], the noisy and condition K/V are cached. Edit steps: the sequence
    holds text + the edited noisy tokens only; their fresh K/V are scattered into the layer's
    noisy cache and the unedited rows blended with the reference (``dtk.scatter_blend``), and the
    queries attend over text + noisy + cached condition keys (``dtk.multi_kv_attention``)."""

    def __init__(self, ctx: ConditionContext, name: str, lam):
        self.ctx, self.name, self.lam = ctx, name, lam

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        import dtk
        from ._common import sdpa_bshd
        ctx = self.ctx
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        T, N = ctx.T, ctx.N
        st = ctx.stream
        if ctx.mode == "full":
            out = sdpa_bshd(q, k, v)
            st.layers[self.name] = dict(k=k[:, T:T + N].contiguous(), v=v[:, T:T + N].contiguous(),
                                        kc=k[:, T + N:].contiguous(), vc=v[:, T + N:].contiguous())
        else:
            c = st.layers[self.name]
            lam = ctx.lam
            blend_ref = lam != 1.0 and c["kc"].shape[1] == N     # SpotFusion toward the reference tokens
            kn = dtk.scatter_blend(c["kc"] if blend_ref else c["k"], c["k"], k[:, T:], ctx.index, lam)
            vn = dtk.scatter_blend(c["vc"] if blend_ref else c["v"], c["v"], v[:, T:], ctx.index, lam)
            out = dtk.multi_kv_attention(q, [k[:, :T], kn, c["kc"]], [v[:, :T], vn, c["vc"]])
        return flux_out(attn, out.to(q.dtype), encoder_hidden_states)


def unpack_latents(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """FLUX's packed tokens (B, H*W, C*4) -> latent maps (B, C, 2H, 2W) (inverse of FluxPipeline._pack_latents)."""
    B, _, C4 = tokens.shape
    H, W = grid
    return tokens.view(B, H, W, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, 2 * H, 2 * W)


class SpotEditHandle(AdapterHandle):
    kind = "SpotEdit"

    def __init__(self, model, threshold, warmup, refresh_every, lam, num_condition_tokens):
        super().__init__(model)
        self.threshold, self.warmup, self.refresh_every, self.lam = threshold, warmup, refresh_every, lam
        self.num_condition_tokens = num_condition_tokens
        self.context = ConditionContext()
        self.grids = (FluxGridContext(), FluxGridContext())
        self.streams: Dict[tuple, _SpotStream] = {}    # per (prompt tensor, latent shape)
        self.stream_numbers = StreamNumbers(self.streams)
        self.log = []                   # (stream number, "full" | "edit") per forward

    def reset(self):
        """Drops caches, previous predictions and step counters (start of a new edit)."""
        self.streams.clear()
        self.log.clear()


def apply_spotedit(transformer, *, threshold: float = 0.2, warmup: int = 2, refresh_every: Optional[int] = None,
                   lam: float = 1.0, num_condition_tokens: Optional[int] = None) -> SpotEditHandle:
    """SpotEdit on a FLUX Kontext transformer (image sequence = [noisy tokens, condition tokens]).

    Full steps (the first ``warmup`` steps of a stream, then every ``refresh_every`` steps if set)
    run the whole sequence and fill per-layer caches (noisy and condition K/V) and the prediction.
    After every step the edited tokens are chosen on the device: ``dtk.token_change_score`` between
    the predicted clean latent ``x_t - sigma * v`` and the reference (condition) latents,
    ``score > threshold`` (OR over the batch), ``dtk.mask_to_index``. Edit steps run the transformer
    on text + edited tokens only (the one host sync per step reads their count, in the pre-hook;
    none inside layers); each layer attends over text + fresh + cached keys, with the fresh K/V
    scattered into the cache by ``dtk.scatter_blend`` (``lam`` < 1 blends unedited rows toward the
    reference tokens' K/V, SpotFusion; needs a condition image of the same size), and the
    unedited tokens keep the previous prediction. The prediction keeps the input's length
    (condition rows are zero on edit steps).
    """
    _check_flux(transformer)
    dtk = _sparse_ops()
    handle = SpotEditHandle(transformer, threshold, warmup, refresh_every, lam, num_condition_tokens)
    ctx = handle.context
    for name, attn in iter_flux_attention(transformer):
        handle.set_processor(attn, FluxSpotEditProcessor(ctx, name, lam))

    def pre(kw):
        raw_ids = kw["img_ids"]
        ids = _ids_2d(raw_ids)
        hs = kw["hidden_states"]
        M = ctx.split_from_ids(raw_ids, handle.num_condition_tokens)
        ctx.T, ctx.M, ctx.N = kw["encoder_hidden_states"].shape[1], M, hs.shape[1] - M
        ctx.grid = handle.grids[0].grid_from_ids(raw_ids, 0, ctx.N)
        ctx.ref_grid = handle.grids[1].grid_from_ids(raw_ids, ctx.N) if M else None
        key = (handle.stream_numbers(kw["encoder_hidden_states"]), tuple(hs.shape))
        if key not in handle.streams:
            handle.streams[key] = _SpotStream()
        st = ctx.stream = handle.streams[key]
        s = st.step
        full = (M == 0 or st.index is None or s < handle.warmup or
                (handle.refresh_every is not None and (s - handle.warmup) % handle.refresh_every == 0))
        ctx.mode, ctx.lam = ("full" if full else "edit"), handle.lam
        handle.log.append((list(handle.streams).index(key), ctx.mode))
        ctx.x_noisy, ctx.ref, ctx.sigma = hs[:, :ctx.N], hs[:, ctx.N:], kw["timestep"]
        if not full:
            n = int(st.count)                          # the step's one host sync
            ctx.index = st.index[:n].long()
            kw["hidden_states"] = hs[:, ctx.index]
            kw["img_ids"] = ids[ctx.index]
        return kw

    def post(kw, output):
        st = ctx.stream
        st.step += 1

        def fix(pred):
            if ctx.mode == "full":
                st.prev = pred[:, :ctx.N].contiguous()
                result = pred
            else:
                st.prev.index_copy_(1, ctx.index, pred)
                result = torch.cat([st.prev, st.prev.new_zeros(st.prev.shape[0], ctx.M, st.prev.shape[2])], 1)
            if ctx.M:
                _select(st, pred_noisy=st.prev)
            return result
        return replace_output_sample(output, fix)

    def _select(st, pred_noisy):
        sigma = ctx.sigma.to(pred_noisy.dtype).reshape(-1, 1, 1)
        x0 = ctx.x_noisy - sigma * pred_noisy
        H, W = ctx.grid
        score = dtk.token_change_score([unpack_latents(x0, ctx.grid)], [unpack_latents(ctx.ref, ctx.ref_grid)],
                                       pool=2, size=(2 * H, 2 * W))
        mask = (score > handle.threshold).any(dim=0, keepdim=True)
        index, count = dtk.mask_to_index(mask)
        st.index, st.count = index[0], count[0]

    handle.add_hooks(pre, post)
    handle._attach()
    return handle
