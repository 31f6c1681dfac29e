"""Autograd of dtk.multi_kv_attention and dtk.segment_attention on the CPU (C++ backward):
gradcheck in float64, the out= (in-place scatter) path under autograd, opcheck of the
registrations, torch.compile."""
import pytest
import torch

import dtk
from dtk.ops.sparse.reference import multi_kv_attention_reference as mkv_ref


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def test_gradcheck_multi_kv():
    q = _leaf(1, 9, 4, 6)
    ks = [_leaf(1, L, 2, 6) for L in (5, 0, 7)]
    vs = [_leaf(1, L, 2, 6) for L in (5, 0, 7)]
    kv_index = [None, None, torch.tensor([6, 0, 0, -1, 3])]      # a repeated key and padding
    q_index = torch.tensor([[2, 8, 8, -1, 0]])                   # a repeated row and padding

    def f(q, *kv):
        return dtk.multi_kv_attention(q, kv[:3], kv[3:], kv_index=kv_index, q_index=q_index)

    torch.autograd.gradcheck(f, (q, *ks, *vs), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_segment(with_bias):
    q, k, v = _leaf(1, 12, 2, 6), _leaf(1, 12, 1, 6), _leaf(1, 12, 1, 6)
    cu = [0, 3, 3, 9, 12]
    gm = [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]]   # the last branch sees nothing
    gb = [[0.5, 0, -1.0, 0.2], [0] * 4, [0, 0, 0.3, 0], [0] * 4] if with_bias else None

    def f(q, k, v):
        return dtk.segment_attention(q, k, v, cu, gm, gb)

    torch.autograd.gradcheck(f, (q, k, v), atol=1e-6, rtol=1e-5)


def test_out_variant_under_autograd_scatters_differentiable_rows():
    """With grad recording, out= gives the kernel's values and the gradients of the scattered
    rows (q, keys and the untouched rows of out)."""
    q, k, v = _leaf(1, 10, 2, 8), _leaf(1, 6, 2, 8), _leaf(1, 6, 2, 8)
    base = _leaf(1, 10, 2, 8)
    qi = torch.tensor([[1, 3, -1]])
    out = base.clone()
    res = dtk.multi_kv_attention(q, [k], [v], q_index=qi, out=out)
    assert res is out
    with torch.no_grad():
        want = base.detach().clone()
        dtk.multi_kv_attention(q.detach(), [k.detach()], [v.detach()], q_index=qi, out=want)
    torch.testing.assert_close(out.detach(), want)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v, base))
    rows, _ = mkv_ref(q, [k], [v], q_index=qi)
    ref = base.clone()
    ref[:, [1, 3]] = rows[:, :2]
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, base))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_opcheck_autograd_registration():
    q, k, v = _leaf(1, 8, 2, 8, dtype=torch.float32), _leaf(1, 5, 1, 8, dtype=torch.float32), \
        _leaf(1, 5, 1, 8, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dtk.multi_kv_attention.default,
                          (q, [k, k], [v, v], [None, torch.tensor([4, 0])], torch.tensor([[7, 1]]), None))
    torch.library.opcheck(torch.ops.dtk.segment_attention.default,
                          (q, _leaf(1, 8, 1, 8, dtype=torch.float32), _leaf(1, 8, 1, 8, dtype=torch.float32),
                           torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([[1, 0], [1, 1]], dtype=torch.bool),
                           None, None))


def test_torch_compile_backward():
    q, k, v = _leaf(1, 8, 2, 8, dtype=torch.float32), _leaf(1, 8, 2, 8, dtype=torch.float32), \
        _leaf(1, 8, 2, 8, dtype=torch.float32)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    gm = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)

    def f(q, k, v):
        a = dtk.multi_kv_attention(q, [k[:, :5], k[:, 5:]], [v[:, :5], v[:, 5:]])
        b = dtk.segment_attention(q, k, v, cu, gm)
        return (a * b).sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_group_bias_requiring_grad_is_an_error_not_a_silent_zero_gradient():
    q, k, v = _leaf(1, 6, 2, 4), _leaf(1, 6, 2, 4), _leaf(1, 6, 2, 4)
    gb = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="group_bias"):
        dtk.segment_attention(q, k, v, [0, 2, 6], [[1, 1], [1, 1]], gb)
    out = dtk.segment_attention(q, k, v, [0, 2, 6], [[1, 1], [1, 1]], gb.detach())
    assert out.requires_grad
