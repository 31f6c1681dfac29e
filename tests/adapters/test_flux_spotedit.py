"""SpotEdit on a tiny FLUX (Kontext layout): all tokens edited = a full step; none edited = the
previous prediction; remove()."""
import pytest
import torch

pytest.importorskip("diffusers")

import dtk  # noqa: E402
import dtk.adapters  # noqa: E402

if not hasattr(dtk, "scatter_blend"):
    pytest.skip("sparse/cache ops not in this build", allow_module_level=True)

from dtk.adapters import flux  # noqa: E402

from .models import tiny_flux  # noqa: E402
from .test_flux_condition import kontext_inputs  # noqa: E402

ATOL = 2e-5


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_all_edited_equals_full_step_and_none_keeps_prediction(lam):
    m, ref = tiny_flux(), tiny_flux()
    x = kontext_inputs(4, 6, 4, 6)
    N = 24
    with torch.no_grad():
        dense = ref(**x).sample
    h = flux.apply_spotedit(m, warmup=1, threshold=-1.0, lam=lam)   # every score > -1: all tokens edited
    with torch.no_grad():
        full = m(**x).sample
        torch.testing.assert_close(full, dense, atol=ATOL, rtol=0)
        edit = m(**x).sample                                       # edit step over all tokens
        torch.testing.assert_close(edit[:, :N], dense[:, :N], atol=ATOL, rtol=0)
        h.threshold = float("inf")                                 # selection after this step: nothing edited
        m(**x)
        prev = h.streams[next(iter(h.streams))].prev.clone()
        x2 = dict(x, hidden_states=torch.randn_like(x["hidden_states"]))
        out = m(**x2).sample
        torch.testing.assert_close(out[:, :N], prev, atol=0, rtol=0)
    assert [mode for _, mode in h.log] == ["full", "edit", "edit", "edit"]
    dtk.adapters.remove(m)
    with torch.no_grad():
        assert torch.equal(m(**x).sample, dense)


def test_partial_edit_keeps_unedited_rows():
    m = tiny_flux()
    x = kontext_inputs(4, 6, 4, 6)
    h = flux.apply_spotedit(m, warmup=1, threshold=0.0)
    with torch.no_grad():
        m(**x)
        st = h.streams[next(iter(h.streams))]
        st.index = torch.tensor([1, 5, 7] + [-1] * 21, dtype=torch.int32)
        st.count = torch.tensor(3, dtype=torch.int32)
        prev = st.prev.clone()
        out = m(**x).sample
    keep = torch.ones(24, dtype=torch.bool)
    keep[[1, 5, 7]] = False
    assert torch.equal(out[:, :24][:, keep], prev[:, keep])
    assert not torch.equal(out[:, [1, 5, 7]], prev[:, [1, 5, 7]])


def test_edit_selection_is_the_changed_tokens():
    """After a step the edited tokens are those whose predicted clean latent x_t - sigma * v differs
    from the reference latents (token_change_score > threshold), read from the prediction."""
    m, ref = tiny_flux(), tiny_flux()
    x = kontext_inputs(4, 6, 4, 6)
    N = 24
    with torch.no_grad():
        pred = ref(**x).sample[:, :N]
    x0 = x["hidden_states"][:, :N] - x["timestep"].reshape(-1, 1, 1) * pred
    score = dtk.token_change_score([flux.unpack_latents(x0, (4, 6))],
                                   [flux.unpack_latents(x["hidden_states"][:, N:], (4, 6))], pool=2, size=(8, 12))
    s = score.flatten().sort().values
    gap = int((s[6:18].diff()).argmax()) + 6          # a threshold between two well-separated middle scores
    assert s[gap + 1] - s[gap] > 1e-4
    h = flux.apply_spotedit(m, warmup=1, threshold=float(s[gap] + s[gap + 1]) / 2)
    with torch.no_grad():
        m(**x)
    st = h.streams[next(iter(h.streams))]
    expect = torch.nonzero(score.flatten() > h.threshold).flatten()
    assert 6 <= expect.numel() <= 18
    assert torch.equal(st.index[:int(st.count)].long().sort().values, expect)


def test_edit_step_attends_to_the_fresh_keys_of_edited_tokens():
    """Every token edited: a token's output depends on the other edited tokens' current inputs
    (their fresh K/V, scattered into the cache), not only on the full step's cached K/V."""
    outs = []
    for seed in (0, 1):
        m = tiny_flux()
        x = kontext_inputs(4, 6, 4, 6)
        torch.manual_seed(0)
        x2 = dict(x, hidden_states=x["hidden_states"].clone())
        x2["hidden_states"][:, :20] += 0.5 * torch.randn(1, 20, 8)
        if seed:
            x2["hidden_states"][:, 5] += 1.0                   # only token 5's input differs between the runs
        flux.apply_spotedit(m, warmup=1, threshold=-1.0)        # all tokens edited
        with torch.no_grad():
            m(**x)
            outs.append(m(**x2).sample)
    others = [i for i in range(24) if i != 5]
    assert (outs[0][:, others] - outs[1][:, others]).abs().amax() > 1e-3
