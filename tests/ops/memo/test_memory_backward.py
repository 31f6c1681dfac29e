"""MEMO backward: gradients of memory_linear_attention and memory_linear_attention_update (q, k,
v and the memory state) against float64 autograd through the references; gradcheck; training
across three clips (memory carried with its graph); opcheck; bad input."""
import pytest
import torch

import dtk
from dtk.ops.memo.reference import memory_linear_attention_reference, memory_update_reference

DTYPES = [torch.float64, torch.float32]


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _memory(B, H, D, Dv, dtype):
    kv = torch.rand(B, H, D, Dv, dtype=dtype).requires_grad_()   # a plausible memory: positive z
    z = (torch.rand(B, H, D, dtype=dtype) + 0.1).requires_grad_()
    return kv, z


def _grads(f, leaves, g):
    outs = f(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * gg).sum() for o, gg in zip(outs, g))
    return torch.autograd.grad(loss, leaves)


def _compare(got, want, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, want):
        scale = max(1.0, b.abs().max().item())
        assert a.dtype == b.dtype or dtype != torch.float64
        assert (a.double() - b.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_memory", [False, True])
def test_memory_attention_grads(dtype, with_memory):
    B, S, H, D, Dv = 3, 7, 2, 10, 6
    q, k, v = _leaf(B, S, H, D, dtype=dtype), _leaf(B, S, H, D, dtype=dtype), _leaf(B, S, H, Dv, dtype=dtype)
    leaves = [q, k, v] + (list(_memory(B, H, D, Dv, dtype)) if with_memory else [])
    g = [torch.randn(B, S, H, Dv, dtype=dtype)]

    def op(q, k, v, *mem):
        state = tuple(mem) if mem else None
        return dtk.memory_linear_attention(q, k, v, state, decay=0.8, update_with=False)[0]

    def ref(q, k, v, *mem):
        return memory_linear_attention_reference(q, k, v, *(mem or (None, None)), decay=0.8)
    got = _grads(op, leaves, g)
    want = _grads(ref, [t.detach().double().requires_grad_() for t in leaves], [x.double() for x in g])
    _compare(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_memory", [False, True])
def test_memory_update_grads(dtype, with_memory):
    B, n, H, D, Dv = 2, 5, 3, 8, 4
    k, v = _leaf(B, n, H, D, dtype=dtype), _leaf(B, n, H, Dv, dtype=dtype)
    leaves = [k, v] + (list(_memory(B, H, D, Dv, dtype)) if with_memory else [])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = [torch.randn(B, H, D, Dv, dtype=acc), torch.randn(B, H, D, dtype=acc)]

    def op(k, v, *mem):
        return dtk.memory_linear_attention_update(k, v, tuple(mem) if mem else None, decay=0.7)

    def ref(k, v, *mem):
        return memory_update_reference(k, v, *(mem or (None, None)), decay=0.7)
    got = _grads(op, leaves, g)
    want = _grads(ref, [t.detach().double().requires_grad_() for t in leaves], [x.double() for x in g])
    _compare(got, want, dtype)


def test_gradcheck_and_only_one_output_used():
    q, k, v = _leaf(2, 4, 2, 5), _leaf(2, 4, 2, 5), _leaf(2, 4, 2, 3)
    mem = _memory(2, 2, 5, 3, torch.float64)
    torch.autograd.gradcheck(lambda q, k, v, a, b: dtk.memory_linear_attention(q, k, v, (a, b), update_with=False)[0],
                             (q, k, v, *mem))
    torch.autograd.gradcheck(lambda k, v, a, b: dtk.memory_linear_attention_update(k, v, (a, b))[1], (k, v, *mem))


def test_three_clips_backpropagate_through_the_memory():
    """A loss on the third clip's output reaches the first clip's k and v through the carried
    memory, as in the float64 reference chained the same way."""
    B, S, H, D = 2, 4, 2, 6
    clips = [[_leaf(B, S, H, D) for _ in range(3)] for _ in range(3)]
    g = torch.randn(B, S, H, D, dtype=torch.float64)

    def run(att, upd, clips):
        state = None
        for q, k, v in clips[:-1]:
            state = upd(k, v, state)
        q, k, v = clips[-1]
        return (att(q, k, v, state) * g).sum()

    def op_att(q, k, v, s):
        return dtk.memory_linear_attention(q, k, v, s, decay=0.9, update_with=False)[0]

    def op_upd(k, v, s):
        return dtk.memory_linear_attention_update(k, v, s, decay=0.9)

    def ref_att(q, k, v, s):
        return memory_linear_attention_reference(q, k, v, *(s or (None, None)), decay=0.9)

    def ref_upd(k, v, s):
        return memory_update_reference(k, v, *(s or (None, None)), decay=0.9)
    flat = [t for c in clips for t in c]
    kw = dict(allow_unused=True, materialize_grads=True)   # the first clips' q are not used
    got = torch.autograd.grad(run(op_att, op_upd, clips), flat, **kw)
    want = torch.autograd.grad(run(ref_att, ref_upd, clips), flat, **kw)
    assert got[1].abs().max() > 0    # the first clip's k is reached
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_opcheck():
    q, k, v = (torch.randn(2, 4, 2, 5) for _ in range(3))
    kv, z = torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5) + 0.1
    g = torch.randn(2, 4, 2, 5)
    for mem in ((kv, z), (None, None)):
        torch.library.opcheck(torch.ops.dtk.memory_linear_attention_backward.default, (g, q, k, v, *mem, 0.9))
        torch.library.opcheck(torch.ops.dtk.memory_linear_attention_update_backward.default,
                              (torch.randn(2, 2, 5, 5), None, k, v, *mem, 0.9))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, kv, z)]
    torch.library.opcheck(torch.ops.dtk.memory_linear_attention.default, (*leaves, 0.9))
    torch.library.opcheck(torch.ops.dtk.memory_linear_attention_update.default, (*leaves[1:], 0.9))


def test_bad_input():
    q, k, v = (torch.randn(2, 4, 2, 5) for _ in range(3))
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.dtk.memory_linear_attention_backward(torch.randn(2, 4, 2, 3), q, k, v, None, None, 0.9)
    with pytest.raises(ValueError, match="grad_kv"):
        torch.ops.dtk.memory_linear_attention_update_backward(torch.randn(2, 2, 5), None, k, v, None, None, 0.9)
    with pytest.raises(ValueError, match="mem_kv"):
        torch.ops.dtk.memory_linear_attention_backward(q, q, k, v, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5),
                                                       0.9)


# ---------------------------------------------------------------- memory_linear_attention_step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_memory", [False, True])
def test_step_equals_the_two_ops(dtype, with_memory):
    B, S, H, D, Dv = 3, 7, 2, 10, 6
    q, k, v = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, H, Dv,
                                                                                                      dtype=dtype)
    mem = [t.detach() for t in _memory(B, H, D, Dv, dtype)] if with_memory else [None, None]
    out, kv, z = torch.ops.dtk.memory_linear_attention_step(q, k, v, *mem, 0.8)
    rkv, rz = torch.ops.dtk.memory_linear_attention_update(k, v, *mem, 0.8)
    assert torch.equal(out, torch.ops.dtk.memory_linear_attention(q, k, v, *mem, 0.8))
    assert torch.equal(kv, rkv) and torch.equal(z, rz)
    assert kv.dtype == z.dtype == dtype   # float32, float64 for float64 inputs
    # The wrapper's default update is the step: same results as asking for the two ops separately.
    o2, (kv2, z2) = dtk.memory_linear_attention(q, k, v, None if mem[0] is None else tuple(mem), decay=0.8)
    assert torch.equal(o2, out) and torch.equal(kv2, kv) and torch.equal(z2, z)


def test_step_opcheck():
    q, k, v = (torch.randn(2, 4, 2, 5) for _ in range(3))
    kv, z = torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5) + 0.1
    for mem in ((kv, z), (None, None)):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, *mem)]
        torch.library.opcheck(torch.ops.dtk.memory_linear_attention_step.default, (*leaves, 0.9))


@pytest.mark.parametrize("with_memory", [False, True])
def test_step_gradcheck(with_memory):
    """Through the wrapper's default (fused) path: out and the new state, together and each alone
    (the other outputs' gradients are then None)."""
    q, k, v = _leaf(2, 4, 2, 5), _leaf(2, 4, 2, 5), _leaf(2, 4, 2, 3)
    mem = _memory(2, 2, 5, 3, torch.float64) if with_memory else ()

    def step(*pick):
        def f(q, k, v, *m):
            out, (kv, z) = dtk.memory_linear_attention(q, k, v, tuple(m) if m else None, decay=0.7)
            return tuple((out, kv, z)[i] for i in pick)
        return f
    for pick in ((0, 1, 2), (0,), (1,), (2,)):
        torch.autograd.gradcheck(step(*pick), (q, k, v, *mem))


def test_step_three_clips_backpropagate_through_the_memory():
    """The fused default carries the memory with its graph: a loss on every clip's output and on
    the last memory reaches all clips, as in the float64 references chained the same way."""
    B, S, H, D = 2, 4, 2, 6
    clips = [[_leaf(B, S, H, D) for _ in range(3)] for _ in range(3)]
    g = [torch.randn(B, S, H, D, dtype=torch.float64) for _ in clips]
    gkv, gz = torch.randn(B, H, D, D, dtype=torch.float64), torch.randn(B, H, D, dtype=torch.float64)

    def op(q, k, v, s):
        return dtk.memory_linear_attention(q, k, v, s, decay=0.9)

    def ref(q, k, v, s):
        mem = s or (None, None)
        return (memory_linear_attention_reference(q, k, v, *mem, decay=0.9),
                memory_update_reference(k, v, *mem, decay=0.9))

    def run(step):
        state, loss = None, 0
        for (q, k, v), gg in zip(clips, g):
            out, state = step(q, k, v, state)
            loss = loss + (out * gg).sum()
        return loss + (state[0] * gkv).sum() + (state[1] * gz).sum()
    flat = [t for c in clips for t in c]
    got = torch.autograd.grad(run(op), flat)
    want = torch.autograd.grad(run(ref), flat)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_step_bad_input():
    q, k, v = (torch.randn(2, 4, 2, 5) for _ in range(3))
    kv, z = torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5)
    step = torch.ops.dtk.memory_linear_attention_step
    for args, name in (((q, k, v, torch.rand(2, 2, 5, 4), z), "mem_kv"), ((q, k, v, kv, torch.rand(2, 3, 5)), "mem_z"),
                       ((q, k, v, kv, None), "mem_kv and mem_z"), ((q, k, torch.randn(2, 3, 2, 5), kv, z), "v"),
                       ((q, torch.randn(2, 4, 2, 6), v, kv, z), "k")):
        with pytest.raises(ValueError, match=f"memory_linear_attention_step: {name}"):
            step(*args, 0.9)
    for decay in (-0.1, 1.5):
        with pytest.raises(ValueError, match="memory_linear_attention_step: decay"):
            step(q, k, v, kv, z, decay)
        with pytest.raises(ValueError, match="memory_linear_attention: decay"):
            dtk.memory_linear_attention(q, k, v, (kv, z), decay=decay)
    with pytest.raises(ValueError, match=r"state\[0\] \(kv\)"):
        dtk.memory_linear_attention(q, k, v, (torch.rand(2, 2, 5, 4), z))
