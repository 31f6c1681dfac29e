"""Autograd of dtk.window_attention on the CPU (C++ backward): gradcheck in float64, GQA, extra
keys, opcheck of the registration, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import dtk


def leaves(S, H=2, Hkv=1, D=6, E=0, B=1, dtype=torch.float64):
    make = lambda s, h: torch.randn(B, s, h, D, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(S, H), make(S, Hkv), make(S, Hkv)
    ek, ev = (make(E, Hkv), make(E, Hkv)) if E else (None, None)
    return q, k, v, ek, ev


@pytest.mark.parametrize("geo", [
    dict(grid=(4, 5), window=(3, 2), border="inward", num_prefix=2, tile=(2, 3), E=2),
    dict(grid=(3, 2, 4), radius=2, border="clip", num_prefix=0, tile=None, E=0),
    dict(grid=(7,), window=(3,), border="clip", num_prefix=1, tile=None, E=0),
])
def test_gradcheck(geo):
    geo = dict(geo)
    E = geo.pop("E")
    q, k, v, ek, ev = leaves(geo["num_prefix"] + int(torch.tensor(geo["grid"]).prod()), E=E)
    inputs = tuple(t for t in (q, k, v, ek, ev) if t is not None)

    def f(*t):  # out only: lse is float32, too coarse for finite differences (its gradient is
        # checked against float64 autograd through the reference in test_cpu_backward.py)
        ek_, ev_ = (t[3], t[4]) if E else (None, None)
        return dtk.window_attention(t[0], t[1], t[2], extra_k=ek_, extra_v=ev_, **geo)

    torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)


def test_gradient_of_a_window_covering_the_grid_is_sdpa():
    """Window = whole grid: gradients equal dense SDPA's (float64)."""
    q, k, v, _, _ = leaves(1 + 12, H=2, Hkv=2, D=8)
    out = dtk.window_attention(q, k, v, (3, 4), (3, 4), num_prefix=1)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_rows_without_keys_get_zero_gradients():
    """An inward circle larger than a 1x1 grid leaves the query with no key: out = 0, lse = -inf,
    and every gradient is 0 (not NaN)."""
    q, k, v, _, _ = leaves(1)
    out = dtk.window_attention(q, k, v, (1, 1), radius=4)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for t in (dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


def test_opcheck_autograd_registration():
    q, k, v, ek, ev = leaves(3 + 20, H=4, Hkv=2, D=8, E=2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dtk.window_attention.default,
                          (q, k, v, [4, 5], [3, 3], None, "inward", 3, [2, 2], None, ek, ev))
    out, lse = torch.ops.dtk.window_attention(q, k, v, [4, 5], [3, 3], None, "inward", 3, [2, 2], None, ek, ev)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.dtk.window_attention_backward.default,
                          (g, gl, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), [4, 5], [3, 3], None,
                           "inward", 3, [2, 2], None, ek.detach(), ev.detach()))


def test_torch_compile_backward():
    q, k, v, _, _ = leaves(2 + 30, H=2, dtype=torch.float32)

    def f(q, k, v):
        out, lse = dtk.window_attention(q, k, v, (5, 6), radius=2, border="clip", num_prefix=2, return_lse=True)
        return (out * out).sum() + lse.sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, match", [
    (lambda g, gl, out, lse: (g[:, :-1], gl, out, lse), "grad_out"),
    (lambda g, gl, out, lse: (g, gl, out, lse.double()), "lse"),
    (lambda g, gl, out, lse: (g, gl[:, :1], out, lse), "grad_lse"),
])
def test_backward_bad_input(bad, match):
    q, k, v, _, _ = leaves(12, dtype=torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.dtk.window_attention(q, k, v, [3, 4], [3, 3], None, "inward", 0, None, None, None, None)
    g, gl, out, lse = bad(torch.randn_like(out), torch.randn_like(lse), out, lse)
    for device in ("cpu", "meta"):
        args = [t.to(device) for t in (g, gl, q, k, v, out, lse)]
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            torch.ops.dtk.window_attention_backward(*args, [3, 4], [3, 3], None, "inward", 0, None, None, None, None)
