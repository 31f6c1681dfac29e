"""DualParal block cache on a tiny random Wan transformer: first block = unadapted; later blocks =
a dense reference over [previous pre-norm K/V -> norm_k -> RoPE at the previous frames' positions,
current K/V]; keep_frames; export/import between two models (a multi-GPU driver's hand-off);
streams; remove() bit-for-bit; reset() and per-model caches."""
import pytest
import torch

pytest.importorskip("diffusers")

import dtk  # noqa: E402
import dtk.adapters  # noqa: E402
from dtk.adapters import wan  # noqa: E402

from .models import tiny_wan as _tiny_wan, wan_inputs  # noqa: E402

if not hasattr(dtk, "multi_kv_attention"):
    pytest.skip("this dtk build lacks the sparse/cache ops", allow_module_level=True)

DT = torch.float64
ATOL = 1e-10


def tiny_wan(dtype=torch.float32):
    """The tiny Wan with random QK-norm weights (all ones would make norm_k idempotent, hiding
    whether the cache holds pre- or post-norm keys)."""
    m = _tiny_wan(dtype=dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for b in m.blocks:
            for norm in (b.attn1.norm_q, b.attn1.norm_k):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
    return m


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


def capture_pre_norm_kv(model, x):
    """The unadapted model's attn1 to_k / to_v outputs (pre-norm, pre-RoPE) per layer."""
    ks, vs, hooks = [], [], []
    for b in model.blocks:
        hooks.append(b.attn1.to_k.register_forward_hook(lambda m, a, o: ks.append(o.clone())))
        hooks.append(b.attn1.to_v.register_forward_hook(lambda m, a, o: vs.append(o.clone())))
    run(model, x)
    for h in hooks:
        h.remove()
    return ks, vs


class DenseBlockRef:
    """Reference attn1: current q/k/v as diffusers computes them, the previous block's pre-norm K
    normed by this layer's norm_k, RoPE of the joint video [previous frames, current frames] from
    the model's rotary module on a real latent, concatenation and SDPA."""

    def __init__(self, model, k_prev, v_prev, grid, prev_frames):
        F, H, W = grid
        lat = torch.zeros(1, 4, prev_frames + F, 2 * H, 2 * W, dtype=DT)
        cos, sin = model.rope(lat)
        n = prev_frames * H * W
        self.rope_prev, self.rope_cur = (cos[:, :n], sin[:, :n]), (cos[:, n:], sin[:, n:])
        self.k_prev, self.v_prev = k_prev, v_prev

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        kp = attn.norm_k(self.k_prev).unflatten(2, (attn.heads, -1))
        vp = self.v_prev.unflatten(2, (attn.heads, -1))
        q, k = wan.wan_rope(q, *self.rope_cur), wan.wan_rope(k, *self.rope_cur)
        kp = wan.wan_rope(kp, *self.rope_prev)
        kk, vv = torch.cat([kp, k], dim=1), torch.cat([vp, v], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3))


def reference_block1(x0, x1, grid1, keep=None):
    """Block 1 through an unadapted model whose attn1 layers use DenseBlockRef with the K/V of the
    unadapted block 0 (block 0 of the adapted model = the unadapted model, tested below)."""
    r = tiny_wan(dtype=DT)
    ks, vs = capture_pre_norm_kv(r, x0)
    F0 = x0["hidden_states"].shape[2]
    P = F0 if keep is None else min(keep, F0)
    n = P * grid1[1] * grid1[2]
    for b, k, v in zip(r.blocks, ks, vs):
        b.attn1.set_processor(DenseBlockRef(r, k[:, -n:], v[:, -n:], grid1, P))
    return run(r, x1)


def test_first_block_equals_unadapted():
    m = tiny_wan(dtype=DT)
    x = wan_inputs(3, 4, 5, dtype=DT)
    ref = run(m, x)
    h = wan.apply_block_cache(m)
    torch.testing.assert_close(run(m, x), ref, atol=ATOL, rtol=0)
    assert len(h.cache) == 0 and len(h.staged) == len(m.blocks)
    k, v = h.staged.read((None, 0))
    assert k.shape == (1, 3 * 4 * 5, m.config.num_attention_heads * m.config.attention_head_dim)
    assert h.staged.nbytes == 2 * len(m.blocks) * k.numel() * k.element_size()


@pytest.mark.parametrize("keep", [None, 1])
def test_second_block_equals_dense_reference(keep):
    torch.manual_seed(1)
    x0, x1 = wan_inputs(3, 4, 5, dtype=DT), wan_inputs(2, 4, 5, dtype=DT)
    m = tiny_wan(dtype=DT)
    plain1 = run(m, x1)
    h = wan.apply_block_cache(m, keep_frames=keep)
    run(m, x0)
    run(m, x0)                                   # a block's last forward is what gets handed on
    h.next_block()
    P = 3 if keep is None else keep
    assert len(h.cache) == len(m.blocks) and len(h.staged) == 0 and h.blocks_done == 1
    assert h.cache.nbytes == 2 * len(m.blocks) * P * 20 * 24 * 8
    out = run(m, x1)
    ref = reference_block1(x0, x1, (2, 4, 5), keep)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - plain1).abs().max() > 1e-3     # the previous block matters
    # block 2 reads block 1's K/V (not block 0's): the staged K/V of block 1 were the adapted ones
    h.next_block()
    k1 = h.cache.read((None, 0))[0]
    assert k1.shape[1] == min(P, 2) * 20


def test_float32_multi_kv_path():
    x0, x1 = wan_inputs(2, 3, 4), wan_inputs(2, 3, 4)
    m = tiny_wan()
    h = wan.apply_block_cache(m)
    run(m, x0)
    h.next_block()
    out = run(m, x1)
    ref = reference_block1({k: v.to(DT) if v.is_floating_point() else v for k, v in x0.items()},
                           {k: v.to(DT) if v.is_floating_point() else v for k, v in x1.items()}, (2, 3, 4))
    torch.testing.assert_close(out.to(DT), ref, atol=1e-4, rtol=0)


def test_export_import_between_models_and_streams():
    x0, x1 = wan_inputs(2, 3, 4, dtype=DT), wan_inputs(2, 3, 4, dtype=DT)
    a, b = tiny_wan(dtype=DT), tiny_wan(dtype=DT)
    ha, hb = wan.apply_block_cache(a), wan.apply_block_cache(b)
    run(a, x0)
    sent = ha.export_cache()                      # what rank i sends to rank i+1
    hb.import_cache({key: (k.clone(), v.clone()) for key, (k, v) in sent.items()})
    ha.next_block()
    torch.testing.assert_close(run(b, x1), run(a, x1), atol=0, rtol=0)
    # another stream has no previous block: plain attention
    plain = run(tiny_wan(dtype=DT), x1)
    hb.stream = "uncond"
    torch.testing.assert_close(run(b, x1), plain, atol=ATOL, rtol=0)
    # a block of another spatial size does not fit the cached K/V
    hb.stream = None
    with pytest.raises(RuntimeError, match="does not fit"):
        run(b, wan_inputs(2, 4, 4, dtype=DT))


def test_remove_restores_bit_for_bit():
    m = tiny_wan()
    x = wan_inputs(2, 3, 4)
    ref = run(m, x)
    h = wan.apply_block_cache(m)
    run(m, x)
    h.next_block()
    run(m, x)
    assert dtk.adapters.get_handle(m) is h
    assert dtk.adapters.remove(m)
    assert dtk.adapters.get_handle(m) is None and len(h.cache) == 0 and len(h.staged) == 0
    assert torch.equal(run(m, x), ref)
    wan.apply_block_cache(m)                      # re-apply after remove works
    dtk.adapters.remove(m)


def test_reset_and_separate_models():
    x0, x1 = wan_inputs(2, 3, 4, dtype=DT), wan_inputs(2, 3, 4, dtype=DT)
    a, b = tiny_wan(dtype=DT), tiny_wan(dtype=DT)
    plain1 = run(b, x1)
    ha, hb = wan.apply_block_cache(a), wan.apply_block_cache(b)
    run(a, x0)
    ha.next_block()
    hb.next_block()                               # b never ran: nothing to hand on
    assert len(ha.cache) == len(a.blocks) and ha.cache.nbytes > 0
    assert len(hb.cache) == 0 and hb.cache.nbytes == 0 and ha.cache is not hb.cache
    torch.testing.assert_close(run(b, x1), plain1, atol=ATOL, rtol=0)
    assert (run(a, x1) - plain1).abs().max() > 1e-3
    ha.reset()
    assert len(ha.cache) == 0 and len(ha.staged) == 0 and ha.cache.nbytes == 0 and ha.blocks_done == 0
    torch.testing.assert_close(run(a, x1), plain1, atol=ATOL, rtol=0)


def test_user_cache_offload_and_arguments():
    c = dtk.cache.KVCache(offload=True)
    m = tiny_wan()
    x = wan_inputs(2, 3, 4)
    h = wan.apply_block_cache(m, cache=c, keep_frames=1)
    assert h.cache is c and h.staged.offload
    run(m, x)
    h.next_block()
    assert c.nbytes_on("cpu") == c.nbytes == 2 * len(m.blocks) * 12 * 24 * 4
    dtk.adapters.remove(m)
    with pytest.raises(ValueError):
        wan.apply_block_cache(m, keep_frames=0)
    with pytest.raises(TypeError):
        wan.apply_block_cache(m, cache={})
    with pytest.raises(TypeError):
        wan.apply_block_cache(torch.nn.Linear(2, 2))
