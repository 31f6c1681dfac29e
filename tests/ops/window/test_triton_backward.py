"""Triton backward of window attention (the dq walk and the transposed-plan dk/dv walk) against
float64 autograd through the dense reference: in the interpreter on the CPU (fp32/fp16) or
compiled on a GPU (fp16/bf16)."""
import math
import random

import pytest
import torch

from dtk.ops.window.plan import build_key_plan
from dtk.ops.window.reference import window_attention_reference
from dtk.ops.window.spec import make_spec
from dtk.ops.window.engine import window_attention_backward_triton, window_attention_triton

from ..window.cases import kwargs, make_inputs, random_case
from ...helpers import assert_matches_reference

pytestmark = pytest.mark.triton_engine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
NAMES = ("dq", "dk", "dv", "d_extra_k", "d_extra_v")


def reference_grads(case, tensors, g, gl, dtype):
    """Gradients of sum(out * g) + sum(lse * gl) through the reference evaluated in `dtype`."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    q, k, v, ek, ev = leaves
    out, lse = window_attention_reference(q, k, v, case["grid"], case["window"], extra_k=ek, extra_v=ev,
                                          **kwargs(case))
    loss = (out * g.to(dtype)).sum() + (lse.to(dtype) * gl.to(dtype)).sum()
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(grads) for t in leaves], lse


def run_case(case, dtype, block, with_lse_grad=True):
    tensors = make_inputs(case, dtype, DEVICE)
    q, k, v, ek, ev = tensors
    spec = make_spec(case["grid"], case["window"], case["radius"], case["border"], case["num_prefix"], case["tile"])
    scale = case["scale"] or 1.0 / math.sqrt(case["D"])
    out, lse = window_attention_triton(q, k, v, spec, scale, ek, ev)
    g = torch.randn_like(out)
    _, lse64 = reference_grads(case, tensors, g, torch.zeros_like(lse), torch.float64)
    # lse gradients only on rows that see a key (a row without keys has lse = -inf)
    gl = torch.randn_like(lse) * torch.isfinite(lse64) if with_lse_grad else torch.zeros_like(lse)
    grads = window_attention_backward_triton(g, gl if with_lse_grad else None, q, k, v, out, lse, spec, scale,
                                             ek, ev, block=block)
    ref64, _ = reference_grads(case, tensors, g, gl, torch.float64)
    ref_low, _ = reference_grads(case, tensors, g, gl, dtype)
    for name, got, r64, rlow, t in zip(NAMES, grads, ref64, ref_low, tensors):
        if t is None:
            assert got.shape == (case["B"], 0, case["heads"][1], case["D"]), name
            continue
        assert got.shape == t.shape and got.dtype == dtype, name
        assert_matches_reference(got, r64, rlow, atol=2e-3 if dtype != torch.float32 else 2e-5, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_backward_random(seed, dtype):
    rng = random.Random(seed * 7919 + torch.randint(0, 10**6, ()).item())
    for _ in range(2):
        run_case(random_case(rng, max_side=8, head_dims=(16, 40), max_tokens=100), dtype, block=16,
                 with_lse_grad=rng.random() < 0.5)


@pytest.mark.parametrize("case", [
    dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=5, tile=(4, 4), num_extra=3),
    dict(grid=(3, 5, 6), window=(-1, 3, 4), radius=None, border="inward", num_prefix=0, tile=(2, 3, 3), num_extra=0),
    dict(grid=(2, 3), window=None, radius=4, border="inward", num_prefix=0, tile=None, num_extra=0),  # empty rows
    dict(grid=(37,), window=(6,), radius=None, border="clip", num_prefix=17, tile=None, num_extra=2),
])
def test_backward_named(case):
    run_case(dict(case, heads=(4, 2), D=16, B=2, transposed=True, scale=None), DTYPES[0], block=16)


@pytest.mark.parametrize("D", [40, 80, 128])
def test_backward_head_dims(D):
    case = dict(grid=(5, 6), window=(3, 3), radius=None, border="inward", num_prefix=2, tile=(2, 4),
                num_extra=0, heads=(2, 1), D=D, B=1, transposed=False, scale=None)
    run_case(case, DTYPES[0], block=16)


@pytest.mark.parametrize("geo", [
    dict(grid=(13, 10), window=(5, 4), border="inward", tile=(4, 4)),
    dict(grid=(3, 7, 9), radius=3, border="clip", tile=None),
])
def test_key_plan_is_the_plan_transposed(geo):
    """Every (query block, key block, full/partial) entry of the plan appears exactly once in the
    transposed plan, under its key block, in the right group."""
    spec = make_spec(geo["grid"], geo.get("window"), geo.get("radius"), geo["border"], 0, geo["tile"])
    kp = build_key_plan(spec, 16, torch.device("cpu"))
    plan = kp.plan
    starts = plan.q_blocks[:, 0].tolist()
    expected = set()
    for qb in range(plan.num_blocks):
        c1, c2 = plan.kv_count[qb, 2].item(), plan.kv_count[qb, 4].item()
        for j in range(c2):
            expected.add((starts.index(plan.entries[qb, j, 0].item()), qb, j >= c1))
    got = []
    off = kp.offsets.tolist()
    for kb in range(plan.num_blocks):
        for partial in (0, 1):
            got += [(kb, qb, bool(partial)) for qb in kp.queries[off[2 * kb + partial]:off[2 * kb + partial + 1]].tolist()]
    assert len(got) == len(set(got)) and set(got) == expected


def test_backward_without_coord_table(monkeypatch):
    """The dk/dv walk's division path (grids too large for the packed coordinate table)."""
    import dtk.ops.window.triton_geometry as geometry
    monkeypatch.setattr(geometry, "coord_table", lambda spec, device: None)
    case = dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=5, tile=(4, 4), num_extra=3,
                heads=(2, 1), D=16, B=1, transposed=False, scale=None)
    run_case(case, DTYPES[0], block=16)
