"""LinFusion on a tiny random SD UNet: the module equals LinFusion's formula on known weights,
the UNet runs at two resolutions, LinFusion's weight layout loads, remove() restores."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import dtk.adapters  # noqa: E402
from dtk.adapters import sd  # noqa: E402

from .models import tiny_unet  # noqa: E402


def linfusion_formula(attn, proc, x):
    """LinFusion's GeneralizedLinearAttention.forward, written out (float64)."""
    B, N, _ = x.shape
    h = attn.heads
    q = attn.to_q(x + proc.to_q_(x))
    k = attn.to_k(x + proc.to_k_(x))
    v = attn.to_v(x)
    q, k, v = (t.view(B, N, h, -1).transpose(1, 2) for t in (q, k, v))
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (k.transpose(-2, -1) * N ** -0.5) @ (v * N ** -0.5)
    out = (q @ kv / z).transpose(1, 2).reshape(B, N, -1)
    return attn.to_out[0](out)


class FormulaProcessor:
    def __init__(self, proc):
        self.proc = proc

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert hidden_states.ndim == 3
        return linfusion_formula(attn, self.proc, hidden_states)


def test_module_equals_formula_on_known_weights():
    unet = tiny_unet(dtype=torch.float64)
    h = sd.apply_linear_attention(unet)
    name, attn = sd.self_attention_modules(unet)[0]
    proc = h.processors[name]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(attn.parameters()) + list(proc.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        x = torch.randn(2, 37, attn.to_q.in_features, dtype=torch.float64)
        torch.testing.assert_close(attn(x), linfusion_formula(attn, proc, x), atol=1e-10, rtol=1e-10)


def test_cross_attention_untouched():
    unet = tiny_unet()
    before = {n: m.processor for n, m in unet.named_modules() if n.endswith("attn2")}
    sd.apply_linear_attention(unet)
    for n, m in unet.named_modules():
        if n.endswith("attn2"):
            assert m.processor is before[n]
        if n.endswith("attn1"):
            assert isinstance(m.processor, sd.LinFusionAttnProcessor)


@pytest.mark.parametrize("size", [(8, 8), (12, 16)])
def test_unet_two_resolutions_match_formula(size):
    unet, ref = tiny_unet(), tiny_unet()
    h = sd.apply_linear_attention(unet)
    for name, attn in sd.self_attention_modules(ref):
        attn.set_processor(FormulaProcessor(h.processors[name]))
    x = torch.randn(2, 4, *size)
    t = torch.tensor([10, 500])
    enc = torch.randn(2, 7, 24)
    with torch.no_grad():
        out = unet(x, t, enc).sample
        torch.testing.assert_close(out, ref(x, t, enc).sample, atol=2e-5, rtol=0)
    assert out.shape == x.shape


def linfusion_state_dict(unet, mid=None, seed=3):
    """Random weights in LinFusion's released (ModelMixin) layout: '<i>.<param>' per attn1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (_, attn) in enumerate(sd.self_attention_modules(unet)):
        dim = attn.to_q.in_features
        m = mid or dim
        for br in ("to_q_", "to_k_"):
            out[f"{i}.{br}.0.weight"] = torch.randn(m, dim, generator=g)
            out[f"{i}.{br}.0.bias"] = torch.randn(m, generator=g)
            out[f"{i}.{br}.1.weight"] = torch.randn(m, generator=g)
            out[f"{i}.{br}.1.bias"] = torch.randn(m, generator=g)
            out[f"{i}.{br}.3.weight"] = torch.randn(dim, m, generator=g)
            out[f"{i}.{br}.3.bias"] = torch.randn(dim, generator=g)
        for p, t in attn.named_parameters():
            if p.split(".")[0] in ("to_q", "to_k", "to_v", "to_out"):
                out[f"{i}.{p}"] = torch.randn(t.shape, generator=g)
    return out


def test_linfusion_weights_load_and_remove():
    unet = tiny_unet()
    x, t, enc = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 7, 24)
    with torch.no_grad():
        ref = unet(x, t, enc).sample
    state = linfusion_state_dict(unet, mid=16)
    h = sd.apply_linear_attention(unet, state)
    mods = sd.self_attention_modules(unet)
    for key, value in state.items():
        i, p = key.split(".", 1)
        name, attn = mods[int(i)]
        target = dict(h.processors[name].named_parameters()).get(p)
        if target is None:
            target = dict(attn.named_parameters())[p]
        assert torch.equal(target, value), key
    assert h.processors[mods[0][0]].to_q_[0].out_features == 16
    # the module-path layout loads the same
    unet2 = tiny_unet()
    sd.apply_linear_attention(unet2, {f"{mods[int(k.split('.', 1)[0])][0]}.{k.split('.', 1)[1]}": v
                                      for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(unet2(x, t, enc).sample, unet(x, t, enc).sample, atol=0, rtol=0)
    dtk.adapters.remove(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, enc).sample, ref)


def test_linfusion_weights_errors_list_keys():
    unet = tiny_unet()
    state = linfusion_state_dict(unet)
    state.pop("0.to_k_.3.bias")
    state["99.whatever"] = torch.zeros(1)
    with pytest.raises(KeyError) as e:
        sd.apply_linear_attention(unet, state)
    assert "0.to_k_.3.bias" in str(e.value) and "99.whatever" in str(e.value)
    assert dtk.adapters.get_handle(unet) is None          # a failed load leaves the UNet unadapted
