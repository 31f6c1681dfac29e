"""FreeSwim on a tiny random Wan transformer: window covering the grid = unadapted; dense-mask
reference; dual path semantics and its refresh schedule; remove()."""
import pytest
import torch

pytest.importorskip("diffusers")

import dtk.adapters  # noqa: E402
from dtk.adapters import wan  # noqa: E402
from dtk.ops.window.reference import window_mask  # noqa: E402
from dtk.ops.window.spec import make_spec  # noqa: E402

from .models import assert_same_param_grads, tiny_wan, wan_inputs  # noqa: E402

ATOL = 2e-5


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def test_window_covering_grid_equals_unadapted():
    m = tiny_wan()
    x = wan_inputs(3, 4, 5)
    ref = run(m, x)
    wan.apply_inward_window(m, window=(-1, 4, 9))           # inward windows >= the axis = the whole axis
    torch.testing.assert_close(run(m, x), ref, atol=ATOL, rtol=0)
    dtk.adapters.remove(m)
    assert torch.equal(run(m, x), ref)


class MaskedSelfAttn:
    """Reference attn1 processor: diffusers-equivalent projections + SDPA with a dense window mask."""

    def __init__(self, grid, window, scale=None):
        spec = make_spec(grid, window, border="inward")
        self.mask, self.scale = window_mask(spec), scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = wan.wan_self_qkv(attn, hidden_states, rotary_emb)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask, scale=self.scale)
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


@pytest.mark.parametrize("grid,window", [((3, 5, 6), (-1, 3, 3)), ((2, 6, 4), (1, 5, 2))])
def test_small_window_equals_dense_mask_reference(grid, window):
    m, r = tiny_wan(), tiny_wan()
    x = wan_inputs(*grid)
    for b in r.blocks:
        b.attn1.set_processor(MaskedSelfAttn(grid, window, scale=0.3))
    wan.apply_inward_window(m, window=window, scale=0.3)
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)
    # a second resolution with the same apply
    x2 = wan_inputs(2, 3, 7)
    for b in r.blocks:
        b.attn1.set_processor(MaskedSelfAttn((2, 3, 7), window, scale=0.3))
    torch.testing.assert_close(run(m, x2), run(r, x2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tile", [None, (1, 2, 4)])
def test_training_gradients_equal_dense_mask_reference(tile):
    """FreeSwim fine-tuning: the adapted model's parameter gradients (row-major or tile order)
    equal those of the dense-mask reference processor."""
    grid, window = (3, 5, 6), (-1, 3, 3)
    m, r = tiny_wan(), tiny_wan()
    x = wan_inputs(*grid)
    for b in r.blocks:
        b.attn1.set_processor(MaskedSelfAttn(grid, window, scale=0.3))
    wan.apply_inward_window(m, window=window, scale=0.3, tile=tile)
    g = torch.randn_like(run(m, x))
    (m(**x).sample * g).sum().backward()
    (r(**x).sample * g).sum().backward()
    assert_same_param_grads(m, r)


def capture_cross_pre_out(model, x):
    """The unadapted (full-attention) model's attn2 outputs before to_out, per layer."""
    got, hooks = [], []
    for b in model.blocks:
        hooks.append(b.attn2.to_out[0].register_forward_pre_hook(lambda mod, args: got.append(args[0].clone())))
    run(model, x)
    for h in hooks:
        h.remove()
    return got


def window_with_cross(model, x, window, pre_outs):
    """The window-only adapted model with each attn2's pre-to_out output replaced by pre_outs."""
    h = wan.apply_inward_window(model, window=window)
    hooks = [b.attn2.to_out[0].register_forward_pre_hook(lambda mod, args, p=p: (p,))
             for b, p in zip(model.blocks, pre_outs)]
    out = run(model, x)
    for hk in hooks:
        hk.remove()
    h.remove()
    return out


def test_dual_path_semantics_and_refresh_schedule():
    window = (-1, 3, 3)
    m, full, ref = tiny_wan(), tiny_wan(), tiny_wan()
    xs = [wan_inputs(2, 5, 5) for _ in range(5)]
    enc = xs[0]["encoder_hidden_states"]
    for x in xs:                      # one stream: the same prompt tensor at every step
        x["encoder_hidden_states"] = enc
    h = wan.apply_inward_window(m, window=window, cross_attention_refresh=3)
    refreshed_on = None
    for i, x in enumerate(xs):
        out = run(m, x)
        if i % 3 == 0:
            refreshed_on = x
        expect = window_with_cross(ref, x, window, capture_cross_pre_out(full, refreshed_on))
        torch.testing.assert_close(out, expect, atol=ATOL, rtol=0)
    assert h.refresh_log == [(0, True), (0, False), (0, False), (0, True), (0, False)]
    h.reset()
    assert h.refresh_log == [] and not h.streams


def test_a_freed_prompt_ends_its_stream():
    """Streams follow the prompt tensor objects: when one is freed its step count and cached
    cross-attention go, and the next prompt (whatever its address) starts with a refresh."""
    import gc
    m = tiny_wan(layers=1)
    h = wan.apply_inward_window(m, window=(-1, 3, 3), cross_attention_refresh=3)
    x = wan_inputs(2, 4, 4)
    for _ in range(2):
        run(m, x)
    assert h.refresh_log == [(0, True), (0, False)] and [len(c) for c in h.streams.values()] == [1]
    x["encoder_hidden_states"] = torch.randn_like(x["encoder_hidden_states"])   # a new generation's prompt
    gc.collect()
    assert not h.streams
    run(m, x)
    assert h.refresh_log[-1] == (0, True)


def test_refresh_counts_streams_separately():
    m = tiny_wan(layers=1)
    h = wan.apply_inward_window(m, window=(-1, 3, 3), cross_attention_refresh=2)
    cond, uncond = wan_inputs(2, 4, 4), wan_inputs(2, 4, 4)
    for _ in range(3):                # CFG: two calls per step with different prompt tensors
        run(m, cond)
        run(m, uncond)
    assert h.refresh_log == [(0, True), (1, True), (0, False), (1, False), (0, True), (1, True)]
    out = m(**cond, return_dict=False)[0]
    assert out.shape == cond["hidden_states"].shape


def test_two_wan_models_do_not_interfere():
    a, b = tiny_wan(0), tiny_wan(1)
    ra, rb = tiny_wan(0), tiny_wan(1)
    xa, xb = wan_inputs(2, 4, 6), wan_inputs(3, 5, 3)
    wan.apply_inward_window(a, window=(-1, 3, 3))
    wan.apply_inward_window(b, window=(1, 3, -1), scale=0.2)
    for blk in ra.blocks:
        blk.attn1.set_processor(MaskedSelfAttn((2, 4, 6), (-1, 3, 3)))
    for blk in rb.blocks:
        blk.attn1.set_processor(MaskedSelfAttn((3, 5, 3), (1, 3, -1), scale=0.2))
    oa, ob = run(a, xa), run(b, xb)
    torch.testing.assert_close(oa, run(ra, xa), atol=ATOL, rtol=0)
    torch.testing.assert_close(ob, run(rb, xb), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tile", [(1, 2, 4), (2, 3, 2)])
def test_tile_order_equals_row_major(tile):
    """tile=: tokens permuted once per forward (patch embedding, RoPE in; proj_out back): the same
    prediction as row-major, partial edge tiles included, dual path too; remove() restores."""
    m, r = tiny_wan(), tiny_wan()
    x = wan_inputs(3, 5, 7)
    ref = run(m, x)
    wan.apply_inward_window(r, window=(-1, 3, 5))
    wan.apply_inward_window(m, window=(-1, 3, 5), tile=tile)
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)
    x2 = wan_inputs(2, 4, 3)                                  # a second resolution, same apply
    torch.testing.assert_close(run(m, x2), run(r, x2), atol=ATOL, rtol=0)
    dtk.adapters.remove(m)
    assert torch.equal(run(m, x), ref)
    dtk.adapters.remove(r)
    wan.apply_inward_window(r, window=(-1, 3, 3), cross_attention_refresh=2)
    wan.apply_inward_window(m, window=(-1, 3, 3), cross_attention_refresh=2, tile=tile)
    for _ in range(3):
        torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


def test_tile_auto_picks_a_tile_per_grid():
    """tile="auto": dtk.suggest_tile per new grid (a tile where it helps, row-major where not), the
    same prediction as row-major at both resolutions."""
    m, r = tiny_wan(), tiny_wan()
    wan.apply_inward_window(r, window=(-1, 3, 5))
    h = wan.apply_inward_window(m, window=(-1, 3, 5), tile="auto")
    for grid in ((3, 12, 20), (2, 4, 3)):
        x = wan_inputs(*grid)
        torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)
        assert h.context.tile == dtk.suggest_tile(grid, (-1, 3, 5))
    assert dtk.suggest_tile((3, 12, 20), (-1, 3, 5)) is not None and dtk.suggest_tile((2, 4, 3), (-1, 3, 5)) is None


def test_tile_order_per_token_timestep():
    """Wan 2.2 TI2V passes one timestep per token (B, S): it follows the tokens into tile order."""
    m, r = tiny_wan(), tiny_wan()
    x = wan_inputs(2, 4, 6)
    S = 2 * 4 * 6
    x["timestep"] = torch.rand(1, S) * 1000
    wan.apply_inward_window(r, window=(-1, 3, 3))
    wan.apply_inward_window(m, window=(-1, 3, 3), tile=(1, 2, 4))
    torch.testing.assert_close(run(m, x), run(r, x), atol=ATOL, rtol=0)


def test_tile_argument_errors():
    with pytest.raises(ValueError, match="tile must be"):
        wan.apply_inward_window(tiny_wan(), tile=(2, 2))
    with pytest.raises(ValueError, match="tile must be"):
        wan.apply_inward_window(tiny_wan(), tile=(1, 0, 4))
    with pytest.raises(ValueError, match="tile must be"):
        wan.apply_inward_window(tiny_wan(), tile="best")


@pytest.mark.parametrize("tile", [None, (1, 2, 3)])
def test_qk_norm_and_rope_run_fused(monkeypatch, tile):
    """The window processor's QK-norm (over all heads) and RoPE go through one dtk.rms_norm_rope
    per q and k, in row-major and in tile order, and the model still equals the unadapted one;
    the RoPE tables are converted once per forward, not per layer."""
    from ..helpers import record_results
    m = tiny_wan()
    x = wan_inputs(3, 4, 5)
    ref = run(m, x)
    wan.apply_inward_window(m, window=(-1, 4, 9), tile=tile)
    calls = record_results(monkeypatch, wan, "rms_norm_rope")
    tables = record_results(monkeypatch, wan, "wan_rope_tables")
    torch.testing.assert_close(run(m, x), ref, atol=ATOL, rtol=0)
    assert len(calls) == 2 * len(m.blocks) and len(tables) == 1
