"""Triton engine against the float64 reference: in the interpreter on the CPU (fp32/fp16; bf16
tl.dot is broken in Triton 3.8's interpreter) or compiled on a GPU when one is present."""
import math
import random

import pytest
import torch

import dtk
from dtk.ops.window.reference import window_attention_reference
from dtk.ops.window.spec import make_spec
from dtk.ops.window.engine import window_attention_triton

from ..window.cases import as_dtype, kwargs, make_inputs, random_case
from ...helpers import assert_matches_reference

pytestmark = pytest.mark.triton_engine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def run_case(case, dtype, block, launch=None):
    q, k, v, ek, ev = make_inputs(case, dtype, DEVICE)
    spec = make_spec(case["grid"], case["window"], case["radius"], case["border"], case["num_prefix"], case["tile"])
    scale = case["scale"] or 1.0 / math.sqrt(case["D"])
    out, lse = window_attention_triton(q, k, v, spec, scale, ek, ev, block=block, launch=launch)
    ref = lambda dt: window_attention_reference(  # noqa: E731
        q.to(dt), k.to(dt), v.to(dt), case["grid"], case["window"], extra_k=as_dtype(ek, dt),
        extra_v=as_dtype(ev, dt), **kwargs(case))
    r64, l64 = ref(torch.float64)
    rlow, llow = ref(dtype)  # the reference evaluated in the kernel's dtype (docs/testing.md)
    assert_matches_reference(out, r64, rlow, atol=1e-3 if dtype != torch.float32 else 1e-5)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin), "lse -inf rows differ"
    assert_matches_reference(lse[fin], l64[fin], llow[fin].float(), atol=1e-3, name="lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_triton_random(seed, dtype):
    rng = random.Random(seed * 104729 + torch.randint(0, 10**6, ()).item())
    for _ in range(2):
        run_case(random_case(rng, max_side=8, head_dims=(16, 40), max_tokens=120), dtype, block=rng.choice([16, (32, 16)]))


@pytest.mark.parametrize("D", [40, 64, 80, 128, 160])
def test_triton_head_dims(D):
    case = dict(grid=(5, 6), window=(3, 3), radius=None, border="inward", num_prefix=2, tile=(2, 4),
                num_extra=0, heads=(2, 1), D=D, B=1, transposed=True, scale=None)
    run_case(case, DTYPES[0], block=16)


@pytest.mark.parametrize("case", [
    dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=5, tile=(4, 4), num_extra=3),
    dict(grid=(4, 6, 7), window=(-1, 3, 5), radius=None, border="inward", num_prefix=0, tile=None, num_extra=0),
    dict(grid=(2, 3), window=None, radius=4, border="inward", num_prefix=0, tile=None, num_extra=0),  # empty rows
    dict(grid=(37,), window=(6,), radius=None, border="clip", num_prefix=17, tile=None, num_extra=0),
    # a FLUX-like text prefix (512 + a partial block): many prefix query blocks and key blocks
    dict(grid=(6, 10), window=None, radius=3, border="clip", num_prefix=520, tile=(2, 4), num_extra=4),
])
@pytest.mark.parametrize("prefix_by_dense", [True, False])
def test_triton_named(case, prefix_by_dense):
    """prefix_by_dense: the prefix rows as one dense attention call (cuDNN on a side stream on a
    GPU, torch's flash attention on the CPU), or the Triton kernel's own prefix programs."""
    with dtk.config(window_prefix_by_dense=prefix_by_dense):
        run_case(dict(case, heads=(2, 2), D=16, B=2, transposed=False, scale=None), DTYPES[0], block=16)


def _broken_dense(monkeypatch):
    """The prefix rows' dense kernel replaced by one that fails (a build or card without it);
    returns the list of its calls."""
    from dtk.ops.window import prefix

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no dense attention here")
    monkeypatch.setattr(prefix, "dense_with_lse", broken)
    return calls


def test_triton_prefix_falls_back_when_the_dense_kernel_fails(monkeypatch):
    """A dense-kernel error on the prefix rows (a build or card without it) is said once per
    problem and the Triton kernel's own prefix programs give that call's rows; a later call tries
    the dense kernel again (no process-wide switch), without a second warning."""
    import warnings

    calls = _broken_dense(monkeypatch)
    case = dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=5, tile=(4, 4), num_extra=3,
                heads=(2, 2), D=16, B=1, transposed=False, scale=None)
    with pytest.warns(RuntimeWarning, match="no dense attention here"):
        run_case(case, DTYPES[0], block=16)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # said once per problem
        run_case(case, DTYPES[0], block=16)
    assert len(calls) == 2                            # tried again, and the result is still right


def test_triton_single_loop_engine_falls_back_when_the_dense_kernel_fails(monkeypatch):
    """The single-loop engine hands prefix rows to the dense kernel: when that kernel fails on a
    call, the failure is said once per problem and the main engine (its own prefix programs) gives
    that call's result; the next call tries the dense kernel again."""
    calls = _broken_dense(monkeypatch)
    case = {**WS_CASES[1], "heads": (2, 2), "D": 16, "B": 1, "transposed": False, "scale": None}
    with dtk.config(window_engine="triton-single-loop"):
        with pytest.warns(RuntimeWarning, match="no dense attention here"):
            run_case(case, DTYPES[0], block=None)
        assert dtk.last_engine("window_attention") == "triton" and len(calls) == 1
        run_case(case, DTYPES[0], block=None)
        assert dtk.last_engine("window_attention") == "triton" and len(calls) == 2


def test_triton_gpu_blocks_on_freeswim_tiles():
    """The GPU's block choice for tiles spanning the time axis (128 x 128: one 126-token tile per
    block) on a FreeSwim-like geometry with partial edge tiles."""
    from dtk.ops.window.engine import default_blocks
    case = dict(grid=(21, 10, 13), window=(-1, 5, 7), radius=None, border="inward", num_prefix=0, tile=(21, 3, 2),
                num_extra=0, heads=(2, 2), D=32, B=1, transposed=False, scale=None)
    spec = make_spec(case["grid"], case["window"], None, "inward", 0, case["tile"])
    assert default_blocks(torch.device("cuda"), 128, spec) == (128, 128)
    run_case(case, DTYPES[0], block=(128, 128))


@pytest.mark.parametrize("launch", [(4, 1), (8, 3)])
def test_triton_explicit_launch_config(launch):
    """`launch=` (the sweep's fixed configs, autotuning off) gives the same answers."""
    case = dict(grid=(6, 7), window=(3, 5), radius=None, border="inward", num_prefix=3, tile=(2, 4),
                num_extra=2, heads=(2, 1), D=32, B=1, transposed=True, scale=None)
    run_case(case, DTYPES[0], block=(32, 16), launch=launch)


@pytest.mark.parametrize("launch", [(4,), (0, 2), (4.0, 1)])
def test_triton_bad_launch_config(launch):
    q = torch.randn(1, 12, 1, 16, device=DEVICE, dtype=DTYPES[0])
    with pytest.raises(ValueError, match="launch"):
        window_attention_triton(q, q, q, make_spec((3, 4), (3, 3)), 0.25, launch=launch)


def test_limiting_axes_only_drops_axes_the_window_spans_whole():
    """The kernel skips the mask test of axes where no key can be excluded (AXES): a wrong bit
    would silently drop keys, so check it against the dense mask on every axis."""
    from dtk.ops.window.reference import window_mask
    from dtk.ops.window.triton_geometry import limiting_axes

    for grid, window, radius, border in [((1, 5, 7), (1, 6, 7), None, "clip"),       # w=6 on n=5: clip limits
                                         ((1, 5, 7), (1, 9, 13), None, "clip"),      # 2n-1: whole axis
                                         ((3, 5, 7), (-1, 5, 3), None, "inward"),
                                         ((3, 5, 7), (2, 8, 9), None, "inward"),
                                         ((1, 6, 6), None, 3, "inward"),
                                         ((2, 6, 6), None, 3, "inward"), ((2, 6, 6), None, 3, "clip")]:
        spec = make_spec(grid, window, radius, border)
        bits = limiting_axes(spec)
        m = window_mask(spec).reshape(*spec.grid, *spec.grid)
        for a in range(3):
            # axis a is free iff moving a key along it never changes the mask
            free = all(torch.equal(m.select(3 + a, 0), m.select(3 + a, i)) for i in range(spec.grid[a]))
            if not bits & (1 << a):
                assert free, (grid, window, radius, border, a)


@pytest.mark.parametrize("grid,tile", [((9, 11), (4, 4)), ((4, 6, 7), None), ((37,), None), ((3, 300, 5), (1, 8, 2))])
def test_coord_table_unpacks_to_the_grid_coordinates(grid, tile):
    from dtk.ops.window.plan import coord_table
    from dtk.ops.window.spec import grid_coords
    spec = make_spec(grid, (3,) * len(grid), tile=tile)
    ct = coord_table(spec, torch.device("cpu"))
    c = ct.table.long()
    got = (c >> ct.shift0, (c >> ct.shift1) & ct.mask1, c & ct.mask2)
    for a, want in enumerate(grid_coords(spec)):
        assert torch.equal(got[a], want), a
    # coordinates needing more than 31 bits: no table (the kernels divide positions instead)
    assert coord_table(make_spec((3000, 3000, 3000), (3, 3, 3)), torch.device("cpu")) is None


@pytest.mark.parametrize("case", [
    dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=5, tile=(4, 4), num_extra=3),
    dict(grid=(4, 6, 7), window=(-1, 3, 5), radius=None, border="inward", num_prefix=0, tile=(2, 2, 4), num_extra=0),
])
def test_triton_without_coord_table(case, monkeypatch):
    """Grids whose coordinates do not fit the packed table take the division path: same results."""
    import dtk.ops.window.triton_geometry as geometry
    monkeypatch.setattr(geometry, "coord_table", lambda spec, device: None)
    base = dict(heads=(2, 1), D=16, B=1, transposed=False, scale=None)
    run_case({**base, **case}, DTYPES[0], block=16)


MASK_DOT_CASES = [
    # 2D, key shape (1, 4, 4) fills the 16-key blocks; edge tiles (9 x 11) give other-shaped blocks
    dict(grid=(9, 11), window=(3, 5), radius=None, border="inward", num_prefix=3, tile=(4, 4), num_extra=0),
    dict(grid=(9, 11), window=(4, 3), radius=None, border="clip", num_prefix=0, tile=(4, 4), num_extra=2),
    # FreeSwim-like: the time axis in every window, a (4, 3, 1) or (4, 2, 1) key shape holds 12 or 8
    # of 16 keys (DEAD); the wider window makes full blocks of that shape too
    dict(grid=(4, 6, 7), window=(-1, 3, 5), radius=None, border="inward", num_prefix=0, tile=(4, 3, 1), num_extra=0),
    dict(grid=(4, 6, 7), window=(-1, 5, 5), radius=None, border="inward", num_prefix=0, tile=(4, 2, 1), num_extra=0,
         full_short=True),
    # 1D, key shape (1, 1, 16)
    dict(grid=(37,), window=(6,), radius=None, border="clip", num_prefix=17, tile=None, num_extra=0),
]


@pytest.mark.parametrize("by_dot", [True, False])
@pytest.mark.parametrize("case", MASK_DOT_CASES)
def test_triton_box_mask_by_dot_or_per_score(case, by_dot):
    """Box windows' partial blocks of the plan's key shape: the mask added by tensor-core dots
    (window_mask_by_dot; these cases take that path) and tested per score give the reference's
    output, with large scores too (scale 4: the masked scores' offset must stay far below them)."""
    from dtk.ops._attention.triton import LOG2E
    from dtk.ops.window.plan import build_plan
    from dtk.ops.window.triton_geometry import mask_args
    spec = make_spec(case["grid"], case["window"], case["radius"], case["border"], case["num_prefix"], case["tile"])
    plan = build_plan(spec, 16, 16, torch.device(DEVICE))
    flags = mask_args(spec, plan, 4.0 * LOG2E, torch.device(DEVICE), by_dot)[1]
    assert flags["MASK_DOT"] == by_dot, flags
    assert (plan.kv_count[:, 3] > plan.kv_count[:, 2]).any(), "no partial block of the key shape"
    if math.prod(plan.key_shape) < 16:   # columns past the key shape's keys: the DEAD group
        assert flags["DEAD"] >= 0 or not by_dot, flags
    if case.get("full_short"):           # full blocks of that shape (one mask dot for the DEAD columns)
        assert (plan.kv_count[:, 1] > plan.kv_count[:, 0]).any(), "no full block of the short key shape"
    case = {k: v for k, v in case.items() if k != "full_short"}
    with dtk.config(window_mask_by_dot=by_dot):
        for scale in (None, 4.0):
            run_case({**case, "heads": (4, 2), "D": 16, "B": 2, "transposed": True, "scale": scale}, DTYPES[0],
                     block=16)


@pytest.mark.parametrize("case", [
    dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=2, tile=(3, 5), num_extra=0),
    dict(grid=(3, 6, 7), window=None, radius=2, border="inward", num_prefix=0, tile=(3, 2, 2), num_extra=0),
    dict(grid=(9, 11), window=(4, 3), radius=None, border="inward", num_prefix=0, tile=(3, 5), num_extra=0),
])
def test_triton_short_key_shape_scores_tested(case):
    """Partial blocks of a key shape shorter than the key block, masks tested per score (circles,
    and boxes with window_mask_by_dot off): the columns past the shape's keys are excluded
    (circles: by the per-column term of the distance test)."""
    from dtk.ops.window.plan import build_plan
    spec = make_spec(case["grid"], case["window"], case["radius"], case["border"], case["num_prefix"], case["tile"])
    plan = build_plan(spec, 16, 16, torch.device(DEVICE))
    assert math.prod(plan.key_shape) < 16 and (plan.kv_count[:, 3] > plan.kv_count[:, 2]).any()
    with dtk.config(window_mask_by_dot=False):
        run_case({**case, "heads": (2, 1), "D": 16, "B": 1, "transposed": False, "scale": None}, DTYPES[0], block=16)


@pytest.mark.parametrize("case", MASK_DOT_CASES[1:3] + [
    dict(grid=(9, 11), window=None, radius=3, border="clip", num_prefix=2, tile=(3, 5), num_extra=1)])
def test_triton_without_key_shape_loops(case, monkeypatch):
    """Wide key blocks tested per score skip the key-shape loops (LOCAL off: their blocks go through
    the general full-short and partial loops): same results."""
    import dtk.ops.window.triton as wt
    real = wt.mask_args

    def general(*args):
        vals, flags = real(*args)
        return vals, dict(flags, MASK_DOT=False, DEAD=-1, LOCAL=False)
    monkeypatch.setattr(wt, "mask_args", general)
    case = {k: v for k, v in case.items() if k != "full_short"}
    run_case({**case, "heads": (2, 1), "D": 16, "B": 1, "transposed": False, "scale": None}, DTYPES[0], block=16)


def test_autotuner_drops_four_warp_configs_at_128_row_blocks():
    """The launch autotuner's candidates (tuning_configs): launch_configs', without 4 warps at
    128-row query blocks (they spill in every loop on sm_90a) but with them at 64-row blocks."""
    import triton

    import dtk.ops.window.triton as wt
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in wt.launch_configs(128, 64)]
    assert wt.tuning_configs(128, 128, 64) == [(8, 2), (8, 3)]
    kept = lambda bm: [(c.num_warps, c.num_stages) for c in wt._prune(configs, {}, BLOCK_M=bm, BLOCK_D=128,  # noqa: E731
                                                                        BLOCK_N=64)]
    assert kept(128) == [(8, 2), (8, 3)]
    assert kept(64) == wt.launch_configs(128, 64)
    assert kept(128)[0] == wt.launch_configs(128, 64)[0]   # the untuned default stays a candidate


WS_CASES = [
    dict(grid=(8, 12), window=(3, 5), radius=None, border="inward", num_prefix=5, tile=(4, 4), num_extra=0),
    dict(grid=(8, 12), window=None, radius=3, border="clip", num_prefix=20, tile=(4, 4), num_extra=0),
    dict(grid=(8, 12), window=None, radius=2, border="inward", num_prefix=0, tile=(2, 4), num_extra=0),
    dict(grid=(4, 6, 8), window=(-1, 3, 5), radius=None, border="inward", num_prefix=0, tile=(4, 3, 2), num_extra=0),
    dict(grid=(48,), window=(6,), radius=None, border="clip", num_prefix=3, tile=None, num_extra=0),
    dict(grid=(2, 3), window=None, radius=4, border="inward", num_prefix=0, tile=None, num_extra=0),  # empty rows
]


@pytest.mark.parametrize("case", WS_CASES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_single_loop_engine(case, transposed, dtype):
    """The single-loop engine (window_engine="triton-single-loop", triton_single_loop.py): prefix
    key blocks, full and partial blocks of the key shape in one loop, the prefix rows by the dense
    kernel; the reference's result with GQA, in both layouts, with large scores (scale 4) too."""
    heads = (4, 2) if not case["num_prefix"] else (2, 2)   # prefix rows by the dense kernel: no GQA
    with dtk.config(window_engine="triton-single-loop"):
        for scale in (None, 4.0):
            run_case({**case, "heads": heads, "D": 16, "B": 2, "transposed": transposed, "scale": scale}, dtype,
                     block=None)
            assert dtk.last_engine("window_attention") == "triton-single-loop"


@pytest.mark.parametrize("case", [
    dict(grid=(9, 11), window=(3, 5), radius=None, border="inward", num_prefix=0, tile=(4, 4), num_extra=0),
    dict(grid=(8, 12), window=(3, 5), radius=None, border="inward", num_prefix=0, tile=(4, 4), num_extra=2),
    dict(grid=(8, 12), window=(3, 5), radius=None, border="inward", num_prefix=3, tile=(4, 4), num_extra=0,
         heads=(4, 2)),
])
def test_triton_single_loop_engine_declines(case):
    """Edge tiles with partial blocks of another shape, extra keys, or GQA with prefix rows (the
    dense kernel takes one K/V head per q head): the pinned single-loop engine declines with its
    reason; the default engine ("auto": the main one) runs, with the reference's result."""
    case = {"heads": (2, 1), "D": 16, "B": 1, "transposed": False, "scale": None, **case}
    with dtk.config(window_engine="triton-single-loop"), pytest.raises(ValueError, match="cannot serve this call"):
        run_case(case, DTYPES[0], block=None)
    run_case(case, DTYPES[0], block=None)
    assert dtk.last_engine("window_attention") == "triton"


def test_triton_default_engine_is_the_main_one():
    """window_engine "auto" (the default) runs the main engine, also where the single-loop engine
    could serve the problem; nothing is timed off the GPU."""
    from dtk import _tuning
    before = _tuning.entries("window.blocks")
    run_case({**WS_CASES[0], "heads": (2, 2), "D": 16, "B": 1, "transposed": False, "scale": None}, DTYPES[0],
             block=None)
    assert dtk.last_engine("window_attention") == "triton" and _tuning.entries("window.blocks") == before
