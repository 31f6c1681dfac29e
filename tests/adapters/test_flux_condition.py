"""Condition reuse (OminiControl2 / Kontext layout) on a tiny FLUX: a cached step equals the
uncached step under the same asymmetric mask; refresh schedule; remove()."""
import pytest
import torch

pytest.importorskip("diffusers")

import dtk  # noqa: E402
import dtk.adapters  # noqa: E402

if not hasattr(dtk, "multi_kv_attention"):
    pytest.skip("sparse/cache ops not in this build", allow_module_level=True)

from dtk.adapters import flux  # noqa: E402

from .models import flux_inputs, image_ids, tiny_flux  # noqa: E402

ATOL = 2e-5


def kontext_inputs(H, W, Hc, Wc, text=5):
    x = flux_inputs(H, W, text=text)
    x["hidden_states"] = torch.cat([x["hidden_states"], torch.randn(1, Hc * Wc, 8)], 1)
    x["img_ids"] = torch.cat([x["img_ids"], image_ids(Hc, Wc, frame=1)], 0)
    return x


def asymmetric_mask(T, N, M):
    """[text, noisy, cond]: text and noisy see everything, condition tokens only themselves."""
    S = T + N + M
    m = torch.ones(S, S, dtype=torch.bool)
    m[T + N:, :T + N] = False
    return m


def test_cached_step_equals_uncached_step_under_asymmetric_mask():
    m, ref = tiny_flux(), tiny_flux()
    T, (H, W), (Hc, Wc) = 5, (4, 5), (3, 4)
    x = kontext_inputs(H, W, Hc, Wc, text=T)
    N = H * W
    with torch.no_grad():
        expect = ref(**x, joint_attention_kwargs={"attention_mask": asymmetric_mask(T, N, Hc * Wc)}).sample
    h = flux.apply_condition_reuse(m, refresh_every=3)
    with torch.no_grad():
        first = m(**x).sample                       # write step: full sequence, asymmetric mask
        torch.testing.assert_close(first, expect, atol=ATOL, rtol=0)
        second = m(**x).sample                      # read step: no condition tokens, cached K/V
        torch.testing.assert_close(second[:, :N], expect[:, :N], atol=ATOL, rtol=0)
        assert second.shape == first.shape and not second[:, N:].any()
        # a different noisy latent on a read step = the uncached result with the same (cached) condition
        x2 = dict(x, hidden_states=torch.cat([torch.randn(1, N, 8), x["hidden_states"][:, N:]], 1))
        exp2 = ref(**x2, joint_attention_kwargs={"attention_mask": asymmetric_mask(T, N, Hc * Wc)}).sample
        torch.testing.assert_close(m(**x2).sample[:, :N], exp2[:, :N], atol=ATOL, rtol=0)
        m(**x)
    assert [mode for _, mode in h.log] == ["write", "read", "read", "write"]
    dtk.adapters.remove(m)
    with torch.no_grad():
        assert torch.equal(m(**x).sample, ref(**x).sample)


def test_streams_follow_the_prompt_tensor_and_latent_shape():
    """A freed prompt ends its stream (cached condition K/V dropped; the next prompt writes
    afresh, whatever its address); a new latent shape with the same prompt is its own stream."""
    import gc
    m = tiny_flux()
    x = kontext_inputs(4, 5, 3, 4)
    h = flux.apply_condition_reuse(m)
    with torch.no_grad():
        m(**x)
        m(**x)
        assert [mode for _, mode in h.log] == ["write", "read"] and len(h.streams) == 1
        y = kontext_inputs(3, 6, 3, 4)
        y["encoder_hidden_states"] = x["encoder_hidden_states"]
        m(**y)                                             # same prompt, another latent shape
        assert h.log[-1][1] == "write" and len(h.streams) == 2
        x["encoder_hidden_states"] = torch.randn_like(x["encoder_hidden_states"])   # a new generation
        del y
        gc.collect()
        assert not h.streams
        m(**x)
    assert h.log[-1][1] == "write"
