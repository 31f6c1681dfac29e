"""The C++ CPU kernel of dtk::window_attention_backward against float64 autograd through the
reference (random sweeps, every engine geometry, keys over several chunks, rows without keys),
strided inputs, thread-count independence, argument validation and opcheck."""
import math
import random

import pytest
import torch

import dtk  # noqa: F401
from dtk.ops.window.reference import window_attention_reference
from ...helpers import assert_matches_reference, bshd
from .cases import make_inputs, random_case
from .test_cpu_engine import GEOMETRIES

FWD = torch.ops.dtk.window_attention
BWD = torch.ops.dtk.window_attention_backward
NAMES = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")


def _geo_args(geo):
    """The geometry arguments of both ops, after (q, k, v) / (..., lse), as a tuple."""
    opt = lambda x: None if x is None else list(x)  # noqa: E731
    return (list(geo["grid"]), opt(geo.get("window")), geo.get("radius"), geo.get("border", "inward"),
            geo.get("num_prefix", 0), opt(geo.get("tile")), geo.get("scale"))


def reference_grads(q, k, v, ek, ev, g, gl, geo, dtype=torch.float64):
    """Gradients of (out * g).sum() + (lse * gl).sum() by autograd through the reference evaluated
    in dtype; (B, 0, Hkv, D) zeros for the extra keys when there are none."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v) + ((ek, ev) if ek is not None else ())]
    out, lse = window_attention_reference(
        *ins[:3], geo["grid"], geo.get("window"), radius=geo.get("radius"), border=geo.get("border", "inward"),
        num_prefix=geo.get("num_prefix", 0), tile=geo.get("tile"), scale=geo.get("scale"),
        extra_k=ins[3] if ek is not None else None, extra_v=ins[4] if ek is not None else None)
    loss = (out * g.to(dtype)).sum()
    if gl is not None:
        loss = loss + (lse * gl).sum()  # lse is float32, its gradient gl exactly
    grads = list(torch.autograd.grad(loss, ins))
    if ek is None:
        B, _, Hkv, D = k.shape
        grads += [torch.zeros(B, 0, Hkv, D, dtype=dtype)] * 2
    return grads


def check(geo, q, k, v, ek=None, ev=None, *, with_grad_lse=True):
    """Runs forward then backward of the C++ kernels and compares the gradients with float64 autograd."""
    args = _geo_args(geo)
    out, lse = FWD(q, k, v, *args, ek, ev)
    g = torch.randn_like(out)
    gl = None
    if with_grad_lse:
        gl = torch.randn_like(lse)
        gl[torch.isinf(lse)] = 0  # (the reference's gradient there is NaN * 0)
    grads = BWD(g, gl, q, k, v, out, lse, *args, ek, ev)
    refs = reference_grads(q, k, v, ek, ev, g, gl, geo)
    # Low precision: the rule of tests/helpers.py against autograd through the reference in the kernel's dtype.
    lowp = None if q.dtype == torch.float64 else reference_grads(q, k, v, ek, ev, g, gl, geo, q.dtype)
    B, _, Hkv, D = k.shape
    like = (q, k, v) + ((ek, ev) if ek is not None else (torch.empty(B, 0, Hkv, D),) * 2)
    for i, (name, x, ref, t) in enumerate(zip(NAMES, grads, refs, like)):
        assert x.shape == t.shape and x.dtype == q.dtype and x.is_contiguous(), name
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        if lowp is None:
            torch.testing.assert_close(x, ref, atol=1e-9 * scale, rtol=0, msg=name)
        else:
            atol = (1e-5 if q.dtype == torch.float32 else 5e-3) * scale
            assert_matches_reference(x, ref, lowp[i], atol=atol, name=name)
    return out, lse, grads


def _inputs(B, S, H, Hkv, D, E, dtype, transposed=False):
    q, k, v = (bshd(B, S, h, D, dtype, transposed=transposed) for h in (H, Hkv, Hkv))
    ek, ev = (bshd(B, E, Hkv, D, dtype), bshd(B, E, Hkv, D, dtype)) if E else (None, None)
    return q, k, v, ek, ev


# ---------------------------------------------------------------------------------------------
# Against float64 autograd.

@pytest.mark.parametrize("i", range(24))
def test_random_sweep(i):
    # 1D/2D/3D boxes (inward/clip) and circles, tile order, prefix and extra keys, GQA, SDPA-layout
    # (transposed) inputs, scale; float64 and float32, with and without grad_lse.
    rng = random.Random(torch.initial_seed() + i)
    case = random_case(rng, max_side=9, head_dims=(8, 16, 40), max_tokens=150)
    dtype = (torch.float64, torch.float32)[i % 2]
    geo = {k_: case[k_] for k_ in ("grid", "window", "radius", "border", "num_prefix", "tile", "scale")}
    check(geo, *make_inputs(case, dtype), with_grad_lse=rng.random() < 0.6)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_geometries(geo):
    S = 3 + math.prod(geo["grid"])
    check(dict(geo, num_prefix=3), *_inputs(2, S, 4, 2, 16, 2, torch.float64, transposed=True))
    check(geo, *_inputs(1, S - 3, 2, 2, 8, 0, torch.float32), with_grad_lse=False)


# More keys per query block than one chunk (512): window rows, the prefix queries' S keys and the
# extra keys straddle chunk borders.
MULTI_CHUNK = [
    (dict(grid=(700,), window=(601,), border="clip"), 0, 0),
    (dict(grid=(9, 11), radius=7, tile=(4, 4)), 600, 0),
    (dict(grid=(6, 7), window=(3, 3)), 2, 530),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geo,P,E", MULTI_CHUNK, ids=[str(i) for i in range(len(MULTI_CHUNK))])
def test_multi_chunk(geo, P, E, dtype):
    S = P + math.prod(geo["grid"])
    check(dict(geo, num_prefix=P), *_inputs(1, S, 2, 1, 8, E, dtype, transposed=True))


@pytest.mark.parametrize("with_grad_lse", [True, False])
def test_rows_without_keys(with_grad_lse):
    # An inward circle of radius 4 on a 1 x 1 grid holds no key: lse = -inf, every gradient is 0.
    geo = dict(grid=(1, 1), radius=4)
    q, k, v, _, _ = _inputs(2, 1, 4, 2, 8, 0, torch.float64)
    out, lse, (dq, dk, dv, dek, dev) = check(geo, q, k, v, with_grad_lse=with_grad_lse)
    assert torch.isinf(lse).all() and (out == 0).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
    assert dek.shape == dev.shape == (2, 0, 2, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check(dict(grid=(5, 6), window=(3, 3), num_prefix=2), *_inputs(1, 32, 4, 2, 16, 2, dtype))
    check(dict(grid=(3, 4, 5), radius=2, tile=(2, 2, 2), num_prefix=1), *_inputs(1, 61, 2, 1, 40, 0, dtype, True),
          with_grad_lse=False)


# ---------------------------------------------------------------------------------------------
# Layouts and threads.

def _strided(t):
    """A copy of t as a non-contiguous view along its leading dims (last dim contiguous)."""
    big = torch.empty(t.shape[0], 2 * t.shape[1], t.shape[2] + 1, *t.shape[3:], dtype=t.dtype)
    view = big[:, ::2, 1:]
    view.copy_(t)
    return view


def test_strided_inputs_read_in_place():
    geo = dict(grid=(4, 5), window=(3, 3), num_prefix=2, tile=(2, 2))
    q, k, v, ek, ev = _inputs(2, 22, 4, 2, 16, 3, torch.float64)
    args = _geo_args(geo)
    out, lse = FWD(q, k, v, *args, ek, ev)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    want = BWD(g, gl, q, k, v, out, lse, *args, ek, ev)
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S) with S-stride H
    gl_t = gl.transpose(1, 2).contiguous().transpose(1, 2)
    got = BWD(_strided(g), gl_t, _strided(q), _strided(k), _strided(v), _strided(out), lse_t, *args,
              _strided(ek), _strided(ev))
    for name, a, b in zip(NAMES, got, want):
        assert a.is_contiguous() and torch.equal(a, b), name


def test_thread_count_independent():
    # Work items are (batch, kv head) pairs: no races, and each item's sums run in the same order.
    geo = dict(grid=(6, 7), radius=3, border="clip", num_prefix=3)
    q, k, v, ek, ev = _inputs(2, 45, 4, 2, 16, 2, torch.float32, transposed=True)
    args = _geo_args(geo)
    out, lse = FWD(q, k, v, *args, ek, ev)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = BWD(g, gl, q, k, v, out, lse, *args, ek, ev)
        torch.set_num_threads(max(2, threads))
        many = BWD(g, gl, q, k, v, out, lse, *args, ek, ev)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, many):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# Validation: every bad argument raises with its name in the message.

def _base():
    q, k, v, _, _ = _inputs(1, 14, 4, 2, 8, 0, torch.float32)
    out, lse = FWD(q, k, v, [3, 4], [3, 3], None, "inward", 2, None, None, None, None)
    return dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse), q=q, k=k, v=v, out=out, lse=lse,
                grid=[3, 4], window=[3, 3], radius=None, border="inward", num_prefix=2, tile=None, scale=None,
                extra_k=None, extra_v=None)


def _run(**changes):
    a = _base()
    a.update(changes)
    return BWD(*a.values())


BAD = [
    (dict(grad_out=torch.randn(1, 14, 4, 4)), "grad_out"),
    (dict(grad_out=torch.randn(1, 14, 2, 8)), "grad_out"),
    (dict(grad_out=torch.randn(1, 14, 4, 8, dtype=torch.float64)), "grad_out"),
    (dict(grad_out=torch.randn(1, 14, 4, 16)[..., ::2]), "grad_out"),
    (dict(out=torch.randn(1, 13, 4, 8)), "out"),
    (dict(out=torch.randn(14, 4, 8)), "out"),
    (dict(lse=torch.randn(1, 4, 14, dtype=torch.float64)), "lse"),
    (dict(lse=torch.randn(1, 4, 14).half()), "lse"),
    (dict(lse=torch.randn(1, 14, 4)), "lse"),
    (dict(lse=torch.randn(1, 4, 14, 1)), "lse"),
    (dict(grad_lse=torch.randn(1, 4, 14, dtype=torch.float64)), "grad_lse"),
    (dict(grad_lse=torch.randn(1, 4, 13)), "grad_lse"),
    (dict(q=torch.randn(1, 14, 4, 8, dtype=torch.float64)), "k"),
    (dict(k=torch.randn(1, 13, 2, 8)), "k"),
    (dict(extra_k=torch.randn(1, 3, 2, 8)), "extra_"),
    (dict(border="outward"), "border"),
    (dict(grid=[3, 5]), "grid"),
    (dict(window=None), "window"),
    (dict(scale=-1.0), "scale"),
]


@pytest.mark.parametrize("changes,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_inputs(changes, name):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as e:
        _run(**changes)
    assert name in str(e.value), str(e.value)


def test_valid_base_runs():
    grads = _run()
    assert [tuple(x.shape) for x in grads] == [(1, 14, 4, 8), (1, 14, 2, 8), (1, 14, 2, 8), (1, 0, 2, 8),
                                               (1, 0, 2, 8)]
    assert not any(x.isnan().any() for x in grads)
    assert _run(grad_lse=None)[0].shape == (1, 14, 4, 8)


@pytest.mark.parametrize("case", ["box", "circle_tiled_extra"])
def test_opcheck(case):
    q, k, v, ek, ev = _inputs(1, 2 + 20, 4, 2, 8, 3, torch.float32, transposed=True)
    if case == "box":
        geo, ek, ev = ([4, 5], [3, 3], None, "inward", 2, None, None), None, None
    else:
        geo = ([4, 5], None, 2, "clip", 2, [2, 3], 0.5)
    out, lse = FWD(q, k, v, *geo, ek, ev)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *geo, ek, ev)
    torch.library.opcheck(BWD, args)
