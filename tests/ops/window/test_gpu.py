"""GPU checks of the public op (Triton engine, default 128-token blocks), bf16 and fp16."""
import random

import pytest
import torch

import dtk
from dtk.ops.window.reference import window_attention_reference

from ...helpers import assert_matches_reference, graph_replay_equals_eager
from .cases import as_dtype, kwargs, make_inputs, random_case

pytestmark = pytest.mark.gpu


def check(case, dtype):
    q, k, v, ek, ev = make_inputs(case, dtype, "cuda")
    out, lse = dtk.window_attention(q, k, v, case["grid"], case["window"], extra_k=ek, extra_v=ev,
                                    return_lse=True, **kwargs(case))
    ref = lambda dt: window_attention_reference(  # noqa: E731
        q.to(dt), k.to(dt), v.to(dt), case["grid"], case["window"], extra_k=as_dtype(ek, dt),
        extra_v=as_dtype(ev, dt), **kwargs(case))
    r64, l64 = ref(torch.float64)
    rlow, llow = ref(dtype)
    assert_matches_reference(out, r64, rlow, atol=2e-3)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_matches_reference(lse[fin], l64[fin], llow[fin], atol=2e-3, name="lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_gpu_random(seed, dtype):
    rng = random.Random(seed * 7 + torch.randint(0, 10**6, ()).item())
    for _ in range(6):
        check(random_case(rng, max_side=40, head_dims=(40, 64, 80, 96, 128, 160), max_tokens=3000), dtype)


@pytest.mark.parametrize("case", [
    dict(grid=(48, 64), window=(17, 17), radius=None, border="inward", num_prefix=0, tile=(8, 16), num_extra=0),
    dict(grid=(48, 64), window=(17, 17), radius=None, border="inward", num_prefix=0, tile=None, num_extra=0),
    dict(grid=(40, 56), window=None, radius=8, border="clip", num_prefix=64, tile=(8, 16), num_extra=24),
    dict(grid=(6, 20, 36), window=(-1, 7, 11), radius=None, border="inward", num_prefix=0, tile=None, num_extra=0),
    dict(grid=(6, 20, 36), window=(-1, 7, 11), radius=None, border="inward", num_prefix=0, tile=(1, 8, 16), num_extra=0),
    # FreeSwim-style tiles over the whole time axis: 128 x 128 blocks (default_blocks), partial edge tiles
    dict(grid=(21, 10, 13), window=(-1, 5, 7), radius=None, border="inward", num_prefix=0, tile=(21, 3, 2), num_extra=0),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_headline_geometries(case, dtype):
    check(dict(case, heads=(4, 2), D=128, B=1, transposed=True, scale=None), dtype)


def test_gpu_bad_input():
    q = torch.randn(1, 16, 2, 64, device="cuda")
    with pytest.raises(TypeError, match="dtype"):
        dtk.window_attention(q, q, q, (4, 4), 3)
    q = torch.randn(1, 16, 2, 320, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim"):
        dtk.window_attention(q, q, q, (4, 4), 3)


def _compiled_variants(fn) -> int:
    """Compiled variants of a Triton JITFunction on every device (Triton 3.6-3.8 layouts)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in fn.cache.values())


def test_gpu_new_grids_compile_nothing_new(monkeypatch):
    """A new resolution builds a new plan, never a new kernel: the geometry arguments are not
    specialised (strides keep their divisibility, so the grids here change none)."""
    from dtk.ops.window.triton import _window_fwd
    monkeypatch.setenv("DTK_TRITON_AUTOTUNE", "0")

    def call(grid):
        S = 7 + grid[0] * grid[1]
        q, k, v = (torch.randn(1, S, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = dtk.window_attention(q, k, v, grid, (9, 9), num_prefix=7, tile=(8, 16))
        assert out.isfinite().all()
    call((32, 48))
    before = _compiled_variants(_window_fwd)
    for grid in ((40, 56), (33, 47), (64, 64), (17, 100)):
        call(grid)
    assert _compiled_variants(_window_fwd) == before


def test_gpu_opcheck():
    """The fake kernels and autograd registration against the Triton CUDA kernels."""
    q, k, v = (torch.randn(1, 3 + 80, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    ek, ev = (torch.randn(1, 5, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.library.opcheck(torch.ops.dtk.window_attention.default,
                          (q, k, v, [8, 10], [3, 5], None, "inward", 3, [4, 4], None, ek, ev))
    out, lse = torch.ops.dtk.window_attention(q, k, v, [80], None, 6, "clip", 3, None, 0.3, None, None)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.dtk.window_attention_backward.default,
                          (g, None, q, k, v, out, lse, [80], None, 6, "clip", 3, None, 0.3, None, None))


def test_gpu_compile_and_new_grid_without_recompiling_the_kernel():
    f = torch.compile(lambda q, k, v, g: dtk.window_attention(q, k, v, g, (5, 5), tile=(4, 8)), fullgraph=True)
    for grid in ((16, 24), (20, 28)):
        S = grid[0] * grid[1]
        q, k, v = (torch.randn(1, S, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch.testing.assert_close(f(q, k, v, grid), dtk.window_attention(q, k, v, grid, (5, 5), tile=(4, 8)))


def grads(fn, tensors, g, gl):
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    loss = (out * g.to(out.dtype)).sum() + (lse * gl.to(lse.dtype)).sum()
    present = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(it) for t in leaves]


@pytest.mark.parametrize("case", [
    dict(grid=(32, 48), window=(13, 17), radius=None, border="inward", num_prefix=0, tile=(8, 8), num_extra=0),
    dict(grid=(40, 56), window=None, radius=8, border="clip", num_prefix=64, tile=(8, 16), num_extra=24),
    dict(grid=(5, 16, 24), window=(-1, 7, 11), radius=None, border="inward", num_prefix=0, tile=None, num_extra=0),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backward(case, dtype):
    """Autograd through the op (Triton dq and dk/dv passes at 64 x 64 blocks) against float64
    autograd through the reference, out and lse gradients together."""
    case = dict(case, heads=(4, 2), D=128, B=1, transposed=True, scale=None)
    tensors = make_inputs(case, dtype, "cuda")

    def call(op, **extra):
        return lambda q, k, v, ek, ev: op(q, k, v, case["grid"], case["window"], extra_k=ek, extra_v=ev,
                                          **extra, **kwargs(case))

    g = torch.randn(tensors[0].shape, device="cuda")
    with torch.no_grad():
        _, l64 = call(window_attention_reference)(*(as_dtype(t, torch.float64) for t in tensors))
    gl = torch.randn(l64.shape, device="cuda") * torch.isfinite(l64)
    got = grads(call(dtk.window_attention, return_lse=True), tensors, g, gl)
    r64 = grads(call(window_attention_reference), [as_dtype(t, torch.float64) for t in tensors], g, gl)
    rlow = grads(call(window_attention_reference), tensors, g, gl)
    for name, a, b, c in zip(("dq", "dk", "dv", "d_extra_k", "d_extra_v"), got, r64, rlow):
        if b is not None:
            assert_matches_reference(a, b, c, atol=2e-3, name=name)


def test_gpu_compile_backward():
    """torch.compile(fullgraph) of a training step through the op: same gradients as eager."""
    q, k, v = (torch.randn(1, 4 + 16 * 24, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step(q, k, v):
        out, lse = dtk.window_attention(q, k, v, (16, 24), radius=4, num_prefix=4, tile=(4, 8), return_lse=True)
        return (out.float() ** 2).sum() + lse.sum()

    eager = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("blocks", ["128,64", "128,128", "64,64"])
@pytest.mark.parametrize("case", [
    dict(grid=(48, 64), window=(17, 17), radius=None, border="inward", num_prefix=0, tile=(8, 16), num_extra=0),
    dict(grid=(40, 56), window=None, radius=8, border="clip", num_prefix=64, tile=(8, 16), num_extra=24),
])
def test_gpu_every_block_candidate(blocks, case, monkeypatch):
    """Each block size the engine's block autotuning may pick gives the reference's result."""
    monkeypatch.setenv("DTK_WINDOW_BLOCKS", blocks)
    check(dict(case, heads=(4, 2), D=128, B=1, transposed=False, scale=None), torch.bfloat16)


def test_gpu_block_autotuning_keeps_a_candidate(monkeypatch):
    """With autotuning on, the first call times block_candidates on its own tensors and keeps the
    fastest for the problem; the result is the reference's."""
    from dtk import _tuning
    from dtk.ops.window.engine import block_candidates
    from dtk.ops.window.spec import make_spec
    monkeypatch.setenv("DTK_TRITON_AUTOTUNE", "1")
    monkeypatch.delenv("DTK_WINDOW_BLOCKS", raising=False)
    case = dict(grid=(32, 48), window=(9, 13), radius=None, border="inward", num_prefix=0, tile=(8, 16),
                num_extra=0, heads=(2, 2), D=64, B=1, transposed=False, scale=None)
    before = set(_tuning.entries("window.blocks"))
    check(case, torch.float16)
    tuned = _tuning.entries("window.blocks")
    new = [key for key in tuned if key not in before]   # key: (problem, settings); problem[0]: the spec
    assert len(new) == 1 and new[0][0][0] == make_spec((32, 48), (9, 13), tile=(8, 16))
    assert tuned[new[0]] in block_candidates(64, new[0][0][0])


def test_gpu_prefix_rows_by_cudnn_on_a_side_stream():
    """The prefix (text) rows by one cuDNN call on a side stream beside the Triton kernel: the
    reference's result, the same as the Triton kernel's own prefix programs up to rounding, and
    inside a CUDA graph (no side stream) a replay gives the eager result."""
    case = dict(grid=(24, 32), window=None, radius=5, border="clip", num_prefix=200, tile=(8, 16), num_extra=0,
                heads=(4, 4), D=128, B=1, transposed=False, scale=None)
    check(case, torch.bfloat16)
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, "cuda")
    args = dict(radius=5, border="clip", num_prefix=200, tile=(8, 16))
    by_dense = dtk.window_attention(q, k, v, (24, 32), **args)
    with dtk.config(window_prefix_by_dense=False):
        by_triton = dtk.window_attention(q, k, v, (24, 32), **args)
    assert (by_dense.float() - by_triton.float()).abs().max() < 2e-2
    assert graph_replay_equals_eager(lambda x: dtk.window_attention(x, k, v, (24, 32), **args), q)


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not _hopper(), reason="the single-loop engine needs Hopper (sm_90) or newer")
@pytest.mark.parametrize("case", [
    dict(grid=(48, 64), window=(17, 17), radius=None, border="inward", num_prefix=0, tile=(8, 16), num_extra=0),
    dict(grid=(48, 64), window=None, radius=8, border="clip", num_prefix=64, tile=(8, 16), num_extra=0),
    dict(grid=(48, 64), window=None, radius=16, border="clip", num_prefix=100, tile=(8, 16), num_extra=0),
    dict(grid=(21, 9, 12), window=(-1, 5, 7), radius=None, border="inward", num_prefix=0, tile=(21, 3, 2), num_extra=0),
])
def test_gpu_single_loop_engine(case):
    """The warp-specialized single-loop engine (window_engine="triton-single-loop"): the
    reference's result in both layouts (d = 128 and 64), and in a CUDA graph a replay gives the
    eager result."""
    with dtk.config(window_engine="triton-single-loop"):
        for transposed, D in ((False, 128), (True, 128), (False, 64)):
            check(dict(case, heads=(4, 4), D=D, B=1, transposed=transposed, scale=None), torch.bfloat16)
            assert dtk.last_engine("window_attention") == "triton-single-loop", "the single-loop engine did not run"
    c = dict(case, heads=(4, 4), D=128, B=1, transposed=False, scale=None)
    q, k, v, _, _ = make_inputs(c, torch.bfloat16, "cuda")
    assert graph_replay_equals_eager(lambda x: dtk.window_attention(x, k, v, c["grid"], c["window"], **kwargs(c),
                                                                    engine="triton-single-loop"), q)
