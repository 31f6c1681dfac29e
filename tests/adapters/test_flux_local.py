"""CLEAR on a tiny random FLUX transformer: equivalence with the unadapted model, with a dense-mask
reference processor, tile order, resolutions, remove(), and CLEAR's weight layout."""
import pytest
import torch

pytest.importorskip("diffusers")

import dtk.adapters  # noqa: E402
from dtk.adapters import flux  # noqa: E402

from .models import assert_same_param_grads, flux_inputs, image_ids, tiny_flux  # noqa: E402

ATOL = 2e-5


def clear_mask(H, W, P, radius, num_extra=0):
    """CLEAR's mask built densely from coordinates (as upstream's mask_mod): text rows/cols global,
    image-image pairs inside the circle, pooled keys seen by image queries only."""
    S = P + H * W
    idx = torch.arange(S)
    y, x = (idx - P) // W, (idx - P) % W
    img = idx >= P
    near = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < radius ** 2
    m = ~img[:, None] | ~img[None, :] | near
    if num_extra:
        m = torch.cat([m, img[:, None].expand(S, num_extra)], dim=1)
    return m


class DenseMaskProcessor:
    """Reference: diffusers' projections, then SDPA with the dense CLEAR mask (and CLEAR's pooled
    keys computed with its own formula)."""

    def __init__(self, H, W, radius, spatial_weight=None, df=None, scale=None):
        self.H, self.W, self.radius, self.w, self.df, self.scale = H, W, radius, spatial_weight, df, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = flux.flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        H, W, df = self.H, self.W, self.df
        P = q.shape[1] - H * W
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # (B, heads, S, D) as CLEAR
        E = 0
        if df:
            kd = (k[:, :, P:].unflatten(2, (H // df, df, W // df, df)) * self.w).sum(dim=(3, 5)).flatten(2, 3)
            vd = (v[:, :, P:].unflatten(2, (H // df, df, W // df, df)) * self.w).sum(dim=(3, 5)).flatten(2, 3)
            k, v, E = torch.cat([k, kd], 2), torch.cat([v, vd], 2), kd.shape[2]
        mask = clear_mask(H, W, P, self.radius, E)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return flux.flux_out(attn, out.transpose(1, 2), encoder_hidden_states)


def set_reference(model, **kw):
    for _, attn in flux.iter_flux_attention(model):
        attn.set_processor(DenseMaskProcessor(**kw))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def test_radius_covering_grid_equals_unadapted():
    m = tiny_flux()
    x = flux_inputs(5, 7)
    ref = run(m, x)
    flux.apply_local_attention(m, radius=5 + 7)
    torch.testing.assert_close(run(m, x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("radius,H,W", [(2, 6, 7), (3, 9, 5)])
def test_small_radius_equals_dense_mask_reference(radius, H, W):
    m, r = tiny_flux(), tiny_flux()
    x = flux_inputs(H, W)
    set_reference(r, H=H, W=W, radius=radius)
    flux.apply_local_attention(m, radius=radius)
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


def test_downsample_and_proportional_scale_equal_reference():
    H, W, df, radius = 8, 6, 2, 3
    m, r = tiny_flux(), tiny_flux()
    x = flux_inputs(H, W)
    h = flux.apply_local_attention(m, radius=radius, downsample=df, proportional_scale=True)
    w = torch.rand(1, 1, 1, df, 1, df, 1)
    for proc in h.processors.values():
        assert torch.equal(proc.spatial_weight, torch.full_like(proc.spatial_weight, 1 / df ** 2))
        with torch.no_grad():
            proc.spatial_weight.copy_(w)
    S = 5 + H * W
    import math
    scale = math.sqrt(math.log(10 * S, 4608) / 16)
    set_reference(r, H=H, W=W, radius=radius, spatial_weight=w, df=df, scale=scale)
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


def test_proportional_scale_without_downsample():
    """sqrt(log_4608(N) / d) with N the sequence length (CLEAR's 10 N applies to its pooled variant only)."""
    import math
    H, W = 6, 7
    m, r = tiny_flux(), tiny_flux()
    x = flux_inputs(H, W)
    flux.apply_local_attention(m, radius=3, proportional_scale=True)
    set_reference(r, H=H, W=W, radius=3, scale=math.sqrt(math.log(5 + H * W, 4608) / 16))
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


def test_two_resolutions_one_apply():
    m, r = tiny_flux(), tiny_flux()
    flux.apply_local_attention(m, radius=3)
    for H, W in [(6, 6), (4, 9), (6, 6)]:
        x = flux_inputs(H, W)
        set_reference(r, H=H, W=W, radius=3)
        torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tile", [(2, 4), (3, 3)])
def test_tile_order_equals_row_major(tile):
    a, b = tiny_flux(), tiny_flux()
    x = flux_inputs(7, 10)
    flux.apply_local_attention(a, radius=3, downsample=2)
    flux.apply_local_attention(b, radius=3, downsample=2, tile=tile)
    torch.testing.assert_close(run(b, x), run(a, x), atol=ATOL, rtol=0)
    out = b(**x, return_dict=False)[0]                            # tuple outputs are permuted back too
    torch.testing.assert_close(out, run(a, x), atol=ATOL, rtol=0)


def test_tile_auto_picks_a_tile_per_grid():
    """tile="auto": dtk.suggest_tile per new grid, same result as row-major at each resolution."""
    a, b = tiny_flux(), tiny_flux()
    flux.apply_local_attention(a, radius=3, downsample=2)
    h = flux.apply_local_attention(b, radius=3, downsample=2, tile="auto")
    for H, W in ((16, 40), (7, 10)):
        x = flux_inputs(H, W)
        torch.testing.assert_close(run(b, x), run(a, x), atol=ATOL, rtol=0)
        assert h.context.tile == dtk.suggest_tile((H, W), radius=3)
    assert dtk.suggest_tile((16, 40), radius=3) is not None and dtk.suggest_tile((7, 10), radius=3) is None


def test_new_ids_tensor_at_a_reused_address_is_read_again():
    """The grid comes from the ids tensor object the pipeline passes, not its address: new ids in
    the memory of the previous ones (same data_ptr, shape and version) get their own grid."""
    m, r = tiny_flux(), tiny_flux()
    flux.apply_local_attention(m, radius=3, tile=(2, 2))
    storage = torch.empty(36 * 3).untyped_storage()

    def ids_in_storage(H, W):
        t = torch.empty(0).set_(storage, 0, (36, 3))
        t.copy_(image_ids(H, W))
        return t
    x = flux_inputs(4, 9)
    x["img_ids"] = ids_in_storage(4, 9)
    run(m, x)
    first = x["img_ids"]
    y = flux_inputs(6, 6)
    y["img_ids"] = ids_in_storage(6, 6)
    assert y["img_ids"].data_ptr() == first.data_ptr() and y["img_ids"]._version == first._version
    set_reference(r, H=6, W=6, radius=3)
    torch.testing.assert_close(run(m, y), run(r, y), atol=ATOL, rtol=0)


def test_remove_restores_bit_for_bit():
    m = tiny_flux()
    x = flux_inputs(6, 5)
    ref = run(m, x)
    procs = [attn.processor for _, attn in flux.iter_flux_attention(m)]
    keys = set(m.state_dict())
    h = flux.apply_local_attention(m, radius=2, downsample=2, tile=(2, 2))
    assert dtk.adapters.get_handle(m) is h
    assert not torch.equal(run(m, x), ref)
    with pytest.raises(RuntimeError, match="already has a dtk adapter"):
        flux.apply_local_attention(m, radius=2)
    assert dtk.adapters.remove(m)
    assert torch.equal(run(m, x), ref)
    assert [attn.processor for _, attn in flux.iter_flux_attention(m)] == procs
    assert set(m.state_dict()) == keys
    assert dtk.adapters.get_handle(m) is None and not dtk.adapters.remove(m)


def test_two_models_do_not_interfere():
    a, b, ra, rb = tiny_flux(0), tiny_flux(1), tiny_flux(0), tiny_flux(1)
    flux.apply_local_attention(a, radius=2)
    flux.apply_local_attention(b, radius=4, tile=(2, 2))
    xa, xb = flux_inputs(5, 6), flux_inputs(7, 4)
    set_reference(ra, H=5, W=6, radius=2)
    set_reference(rb, H=7, W=4, radius=4)
    oa, ob = run(a, xa), run(b, xb)                       # interleaved resolutions
    torch.testing.assert_close(run(a, xa), oa, atol=0, rtol=0)
    torch.testing.assert_close(oa, run(ra, xa), atol=ATOL, rtol=0)
    torch.testing.assert_close(ob, run(rb, xb), atol=ATOL, rtol=0)


def clear_checkpoint(src, df=None):
    """A state dict in CLEAR's released layout, taken from another model."""
    sd = {}
    for name, p in src.named_parameters():
        if any(s in name for s in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")):
            sd[name] = p.detach().clone()
    if df:
        for name, _ in flux.iter_flux_attention(src):
            sd[f"{name}.processor.spatial_weight"] = torch.rand(1, 1, 1, df, 1, df, 1)
    return sd


def test_clear_weights_round_trip_and_remove():
    m, donor = tiny_flux(0), tiny_flux(7)
    x = flux_inputs(6, 6)
    ref = run(m, x)
    flux.apply_local_attention(m, radius=3, downsample=2)
    sd = clear_checkpoint(donor, df=2)
    flux.load_clear_weights(m, {"transformer." + k: v for k, v in sd.items()})
    params = dict(m.named_parameters())
    for k, v in sd.items():
        assert torch.equal(params[k], v), k
    # same as the donor's attention weights with the same adapter
    expect = tiny_flux(0)
    with torch.no_grad():
        for k, v in sd.items():
            if ".processor." not in k:
                dict(expect.named_parameters())[k].copy_(v)
    he = flux.apply_local_attention(expect, radius=3, downsample=2)
    with torch.no_grad():
        for name, proc in he.processors.items():
            proc.spatial_weight.copy_(sd[f"{name}.processor.spatial_weight"])
    torch.testing.assert_close(run(m, x), run(expect, x), atol=0, rtol=0)
    dtk.adapters.remove(m)
    assert torch.equal(run(m, x), ref)


def test_clear_weights_errors_list_keys():
    m = tiny_flux()
    with pytest.raises(RuntimeError, match="apply_local_attention"):
        flux.load_clear_weights(m, {})
    flux.apply_local_attention(m, radius=3, downsample=2)
    sd = clear_checkpoint(tiny_flux(1), df=2)
    sd.pop("transformer_blocks.0.attn.to_q.weight")
    sd["bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as e:
        flux.load_clear_weights(m, sd)
    assert "transformer_blocks.0.attn.to_q.weight" in str(e.value) and "bogus.weight" in str(e.value)
    missing, unexpected = flux.load_clear_weights(m, sd, strict=False)
    assert missing == ["transformer_blocks.0.attn.to_q.weight"] and unexpected == ["bogus.weight"]


def test_training_gradients_equal_reference():
    """CLEAR is trained (distillation / LoRA): the adapted model's parameter gradients, pooling
    weights included, equal those of the dense-mask reference processor."""
    H, W, df, radius = 8, 6, 2, 3
    m, r = tiny_flux(), tiny_flux()
    x = flux_inputs(H, W)
    h = flux.apply_local_attention(m, radius=radius, downsample=df)
    w = torch.rand(1, 1, 1, df, 1, df, 1)
    weights = []
    for proc in h.processors.values():
        with torch.no_grad():
            proc.spatial_weight.copy_(w)
        weights.append(proc.spatial_weight)
    ref_w = w.clone().requires_grad_()
    set_reference(r, H=H, W=W, radius=radius, spatial_weight=ref_w, df=df)
    g = torch.randn_like(run(m, x))
    (m(**x).sample * g).sum().backward()
    (r(**x).sample * g).sum().backward()
    assert_same_param_grads(m, r)
    torch.testing.assert_close(sum(p.grad for p in weights), ref_w.grad, atol=1e-4, rtol=1e-4)


def test_qk_norm_and_rope_run_fused(monkeypatch):
    """FLUX's QK-norm + RoPE go through one dtk.rms_norm_rope per part (image q, k; text q, k in
    joint blocks) and the model still equals the unadapted one; a norm that is not a plain RMS
    norm falls back to the module and diffusers' rotation, with the same result."""
    from ..helpers import record_results
    m = tiny_flux()
    x = flux_inputs(5, 7)
    ref = run(m, x)
    flux.apply_local_attention(m, radius=5 + 7)
    calls = record_results(monkeypatch, flux, "rms_norm_rope")
    torch.testing.assert_close(run(m, x), ref, atol=ATOL, rtol=0)
    assert len(calls) == 4 * len(m.transformer_blocks) + 2 * len(m.single_transformer_blocks)

    class ScaledNorm(torch.nn.Module):   # not an RMS norm: no fusion
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, t):
            return self.norm(t) * 1.5

    r = tiny_flux()
    for _, attn in flux.iter_flux_attention(r):
        attn.norm_q = ScaledNorm(attn.norm_q)
    ref = run(r, x)
    flux.apply_local_attention(r, radius=5 + 7)
    calls.clear()
    torch.testing.assert_close(run(r, x), ref, atol=ATOL, rtol=0)
    # every part but the image queries (joint blocks: image k, text q and k; single blocks: k)
    assert len(calls) == 3 * len(r.transformer_blocks) + len(r.single_transformer_blocks)
