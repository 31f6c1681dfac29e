"""Window attention (`dtk.window_attention`): shapes, implementations and the correctness check.

Implementations, all run in one process on the same tensors:
  dtk              the op (CPU tensors: C++ engine; CUDA tensors: Triton engine); checked first.
  dtk-ws           (GPU set, Hopper) the op with the grid queries' forward by the warp-specialized
                   single-loop engine (dtk.config(window_engine="triton-single-loop"), served only
                   where pinned until measured; skipped where it does not apply).
  dtk+permute      (tile-order cases) the same from row-major tokens: q, k, v permuted to tile
                   order and the output back (dtk.to/from_tile_order) inside the timed call.
  sdpa-<backend>   dense SDPA (no mask: the cost of ignoring locality) for flash, cudnn,
                   efficient, math via torch.nn.attention.sdpa_kernel; a backend that errors is
                   skipped with the error in the row.
  flex             FlexAttention with the equivalent mask_mod (GPU only), in the case's token
                   order (row-major or tile order); mask building time is reported as mask_s.
  natten           NATTEN's na1d/na2d/na3d (optional peer, when importable) on box windows with
                   border "inward" and no prefix; checked. NATTEN's neighborhood is exactly that
                   window, even sizes included: keys [lo, lo + w - 1] per axis with
                   lo = clamp(p - w//2, 0, n - w). The row's `backend` says which NATTEN kernel ran.
  naive            dense boolean mask + SDPA math backend, where memory allows; checked.

FLOPs are the mask's: 4 * B * H * D * pair_count(spec) (exact number of allowed (q, k) pairs), for
every implementation, so TFLOP/s are "effective" and comparable across rows.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, asdict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dtk.ops.layout import tile_permutation
from dtk.ops.window.reference import grid_allowed, masked_attention, window_mask
from dtk.ops.window.spec import box_range, circle_center, grid_coords, make_spec, pair_count

from ..registry import Case, CheckResult, Impl, Prepared, Skip, first_call, probe, register

OP = "window"


@dataclass(frozen=True)
class WindowShape:
    name: str
    B: int
    H: int
    D: int
    grid: Tuple[int, ...]
    window: Optional[Tuple[int, ...]] = None
    radius: Optional[int] = None
    border: str = "inward"
    num_prefix: int = 0
    tile: Optional[Tuple[int, ...]] = None
    note: str = ""

    def spec(self):
        return make_spec(self.grid, self.window, self.radius, self.border, self.num_prefix, self.tile)

    def op_kwargs(self):
        return dict(radius=self.radius, border=self.border, num_prefix=self.num_prefix, tile=self.tile)


# Default (CPU, fp32) set: tiny, the whole run takes well under a minute on 2 cores.
CPU_SHAPES = [
    WindowShape("2d-24x24-w7-p8", 1, 4, 64, (24, 24), window=(7, 7), num_prefix=8),
    WindowShape("2d-24x24-w7-p8-tile4x8", 1, 4, 64, (24, 24), window=(7, 7), num_prefix=8, tile=(4, 8)),
    WindowShape("3d-4x8x8-w(-1,3,5)", 1, 2, 64, (4, 8, 8), window=(-1, 3, 5)),
    WindowShape("circle-r4-20x20-p16-clip", 1, 2, 64, (20, 20), radius=4, border="clip", num_prefix=16),
]

# --gpu set (bf16, d=128): the shapes of docs/benchmarks.md, the issue targets' first.
GPU_SHAPES = [
    WindowShape("flux1024-r16-clip-p512-tile8x16", 1, 24, 128, (64, 64), radius=16, border="clip",
                num_prefix=512, tile=(8, 16), note="CLEAR on FLUX 1024^2"),
    WindowShape("na2d-256-w64-tile8x16", 1, 24, 128, (256, 256), window=(64, 64), tile=(8, 16),
                note="FLUX 4K grid, inward 64x64 window"),
    WindowShape("na2d-256-w64-rowmajor", 1, 24, 128, (256, 256), window=(64, 64)),
    WindowShape("freeswim-1080p-tile21x3x2", 1, 12, 128, (21, 68, 120), window=(-1, 31, 53), tile=(21, 3, 2),
                note="FreeSwim Wan2.1 1080p, 81 frames; tiles spanning the whole time axis (in every window) "
                     "with a 3x2 footprint: plan efficiency 0.88 at 128x128 blocks"),
    WindowShape("freeswim-1080p-tile7x2x8", 1, 12, 128, (21, 68, 120), window=(-1, 31, 53), tile=(7, 2, 8),
                note="stop 7's best tile: plan efficiency 0.59"),
    WindowShape("freeswim-1080p-rowmajor", 1, 12, 128, (21, 68, 120), window=(-1, 31, 53)),
    WindowShape("clear8k-r16-clip-p512-tile8x16", 1, 24, 128, (512, 512), radius=16, border="clip",
                num_prefix=512, tile=(8, 16), note="CLEAR at 8K"),
    # more of docs/benchmarks.md's shapes, after the targets' (a --budget-s run reaches these last)
    WindowShape("flux2048-r16-clip-p512-tile8x16", 1, 24, 128, (128, 128), radius=16, border="clip",
                num_prefix=512, tile=(8, 16), note="CLEAR on FLUX 2048^2"),
    WindowShape("flux4096-r16-clip-p512-tile8x16", 1, 24, 128, (256, 256), radius=16, border="clip",
                num_prefix=512, tile=(8, 16), note="CLEAR on FLUX 4096^2: one layer of the e2e target's forward"),
    WindowShape("flux4096-r16-clip-p512-tile16x8", 1, 24, 128, (256, 256), radius=16, border="clip",
                num_prefix=512, tile=(16, 8), note="the same layer on 16x8 tiles: plan efficiency 0.709 at 64x64 "
                "blocks (8x8 sub-blocks; 8x16 tiles give 4x16 ones: 0.678), 0.636 at 128x128 as 8x16"),
    WindowShape("wan480p-tile21x3x2", 1, 12, 128, (21, 30, 52), window=(-1, 31, 53), tile=(21, 3, 2),
                note="Wan2.1-1.3B 480p, 81 frames: FreeSwim's window covers the whole grid (dense)"),
    WindowShape("wan14b-720p-tile21x3x2", 1, 40, 128, (21, 45, 80), window=(-1, 31, 53), tile=(21, 3, 2),
                note="Wan2.1-14B 720p, 81 frames, FreeSwim window"),
]

SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
CHECK_ALL_ROWS_UP_TO = 2048      # sequences up to this length are checked on every query row
CHECK_ROWS = 256                 # else on this many rows (random, plus the first/last prefix and grid rows)


# ---------------------------------------------------------------------------------------------
# Mask rows and the reference on a subset of query rows (never an S x S mask for big shapes).

def mask_rows(spec, rows: torch.Tensor, device=None) -> torch.Tensor:
    """(len(rows), S) bool: the rows `rows` (sequence positions) of the window mask, built from
    coordinates in O(len(rows) * S); equals window_mask(spec)[rows]."""
    P, S = spec.num_prefix, spec.seq_len
    rows = rows.to(device)
    coords = grid_coords(spec, device)
    out = torch.ones(rows.numel(), S, dtype=torch.bool, device=device)   # prefix rows see all keys
    g = rows >= P
    if g.any():
        gi = rows[g] - P
        allowed = grid_allowed(spec, tuple(c[gi] for c in coords), coords)
        sub = out[g]
        sub[:, P:] = allowed
        out[g] = sub
    return out


def check_rows_for(spec, device) -> torch.Tensor:
    S, P = spec.seq_len, spec.num_prefix
    if S <= CHECK_ALL_ROWS_UP_TO:
        return torch.arange(S, device=device)
    fixed = [0, S - 1, P] + ([P - 1] if P > 0 else [])
    rnd = torch.randperm(S)[:CHECK_ROWS]
    return torch.unique(torch.cat([torch.tensor(fixed), rnd])).to(device)


def reference_rows(state, dtype) -> torch.Tensor:
    """Masked attention on the check rows only, computed in `dtype`, head chunks bounded in memory."""
    q, k, v, rows, spec = state["q"], state["k"], state["v"], state["rows"], state["spec"]
    mask = state.get("_mask_rows")
    if mask is None:
        mask = state["_mask_rows"] = mask_rows(spec, rows, q.device)
    B, S, H, D = q.shape
    per_head = B * rows.numel() * S
    hc = max(1, min(H, (1 << 27) // max(1, per_head)))
    outs = []
    for h0 in range(0, H, hc):
        hs = slice(h0, min(H, h0 + hc))
        qq = q[:, :, hs].index_select(1, rows).to(dtype)
        o, _ = masked_attention(qq, k[:, :, hs].to(dtype), v[:, :, hs].to(dtype), mask, state["scale"])
        outs.append(o)
    return torch.cat(outs, 2)


def check(state, out) -> CheckResult:
    """The correctness rule of docs/testing.md on the check rows: error vs the float64 reference
    <= 2 x (error of the reference computed in the run's dtype) + atol; NaN anywhere in the output
    fails."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    rows = state["rows"]
    against = f"float64 masked reference on {rows.numel()}/{state['spec'].seq_len} query rows"
    B, S, H, D = state["q"].shape
    if tuple(out.shape) != (B, S, H, D):
        return CheckResult(False, float("inf"), 0.0, rows.numel(), against + f"; shape {tuple(out.shape)}")
    if torch.isnan(out).any():
        return CheckResult(False, float("nan"), 0.0, rows.numel(), against + "; NaN in output")
    if "_ref64" not in state:
        state["_ref64"] = reference_rows(state, torch.float64)
        lowp = state["q"].dtype
        state["_base"] = 0.0 if lowp == torch.float64 else \
            (reference_rows(state, lowp).double() - state["_ref64"]).abs().max().item()
    ref = state["_ref64"]
    err = (out.index_select(1, rows).double() - ref).abs().nan_to_num(nan=float("inf")).max().item()
    atol = 1e-5 if state["q"].dtype in (torch.float32, torch.float64) else 1e-3
    tol = 2 * state["_base"] + atol
    return CheckResult(err <= tol, err, tol, rows.numel(), against)


# ---------------------------------------------------------------------------------------------
# Implementations

def _dtk_op():
    try:
        import dtk
    except Exception as e:  # pragma: no cover
        raise Skip(f"import dtk failed: {e!r}"[:200])
    fn = getattr(dtk, "window_attention", None)
    if fn is None:
        raise Skip("dtk.window_attention not available in this build (op not merged yet)")
    return fn


def _prep_dtk(state):
    op = _dtk_op()
    sh: WindowShape = state["shape"]
    q, k, v = state["q"], state["k"], state["v"]
    kw = dict(sh.op_kwargs(), scale=state["scale"])
    fn = lambda: op(q, k, v, sh.grid, sh.window, **kw)  # noqa: E731
    info = first_call(fn, state["device"], "window_attention")
    if state["device"].startswith("cuda"):   # the Triton engine's plan: the share of its work the mask needs
        from dtk.ops.window.plan import build_plan, engine_pairs
        from dtk.ops.window.engine import choose_blocks

        spec = state["spec"]
        blocks = choose_blocks(q, k, v, spec, state["scale"])   # what the first call chose (cached)
        plan = build_plan(spec, *blocks, q.device)
        info["blocks"] = "x".join(map(str, blocks))
        info["plan_eff"] = round(pair_count(spec) / engine_pairs(plan, spec), 3)
    return Prepared(fn, info)


def _prep_dtk_switched(state, settings: dict, label: str, check_applies=None):
    """The dtk row with `settings` of dtk.config in force (Hopper only): a variant of the engine
    that is not the default until a GPU run measures it. `check_applies(state)`: why the variant
    does not take this problem, or ""."""
    import dtk

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise Skip(f"{label} needs Hopper (sm_90) or newer")
    with dtk.config(**settings):
        why = check_applies(state) if check_applies else ""
    if why:
        raise Skip(why)
    inner = _prep_dtk(state).fn

    def fn():
        with dtk.config(**settings):
            return inner()
    return Prepared(fn, first_call(fn, state["device"], f"window_attention ({label})"))


def _ws_declines(state) -> str:
    from dtk.ops.window import engine
    try:
        engine.can_run_single_loop(state["q"], state["k"], state["v"], state["spec"], None, raise_error=True)
    except ValueError as e:
        return str(e)
    return ""


def _prep_dtk_ws(state):
    """dtk with the grid queries' forward by the warp-specialized single-loop engine
    (window_engine="triton-single-loop"); skipped where the engine does not apply (edge tiles,
    extra keys)."""
    return _prep_dtk_switched(state, dict(window_engine="triton-single-loop"), "single-loop engine", _ws_declines)


def _prep_dtk_permute(state):
    """dtk for a caller holding row-major tokens: q, k, v to tile order, the op, the output back,
    all timed (the permutation counts against the window targets)."""
    op = _dtk_op()
    import dtk

    sh: WindowShape = state["shape"]
    order = dict(grid=sh.grid, tile=sh.tile, num_prefix=sh.num_prefix)
    # the case's tensors are in tile order: their row-major copies are this row's inputs (made once)
    q, k, v = (dtk.from_tile_order(x, **order) for x in (state["q"], state["k"], state["v"]))
    kw = dict(sh.op_kwargs(), scale=state["scale"])

    def fn():
        qt, kt, vt = (dtk.to_tile_order(x, **order) for x in (q, k, v))
        return dtk.from_tile_order(op(qt, kt, vt, sh.grid, sh.window, **kw), **order)
    return Prepared(fn, first_call(fn, state["device"], "window_attention+tile_reorder"))


def _permute_check(state, out):
    """The case's check, on the row-major output put back into tile order."""
    import dtk

    sh: WindowShape = state["shape"]
    return check(state, dtk.to_tile_order(out, sh.grid, sh.tile, num_prefix=sh.num_prefix))


_BACKEND = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def _available_bytes(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8.0 * 2 ** 30


def _dense_scores_bytes(state) -> float:
    B, S, H, D = state["q"].shape
    return 3.0 * B * H * S * S * 4      # scores, probabilities, a temporary (fp32 worst case)


def _fmt_gib(x):
    return f"{x / 2 ** 30:.1f} GiB"


def _sdpa_prep(backend):
    def prep(state):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = getattr(SDPBackend, _BACKEND[backend])
        qh, kh, vh, scale = state["qh"], state["kh"], state["vh"], state["scale"]
        if backend == "math":
            need, avail = _dense_scores_bytes(state), _available_bytes(state["device"])
            if need > 0.5 * avail:
                raise Skip(f"memory: needs ~{_fmt_gib(need)}, {_fmt_gib(avail)} available")

        def fn():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2)
        probe(fn, state["device"], f"{backend} backend")
        B, S, H, D = state["q"].shape
        return Prepared(fn, {"dense_flops": 4.0 * B * H * S * S * D})
    return prep


def _sdpa_reuse_key(backend):
    def key(state):
        return ("sdpa", backend, tuple(state["qh"].shape), str(state["qh"].dtype), state["device"])
    return key


_FLEX = None


def _flex_fn():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_mask_mod(spec, device):
    """mask_mod equivalent to window_mask(spec), looking up per-token coordinate tensors (the way
    FlexAttention masks for 2D/3D grids are usually written); the grid tokens are in the spec's
    storage order."""
    P = spec.num_prefix
    coords = grid_coords(spec, device)
    zeros = torch.zeros(P, dtype=torch.int64, device=device)
    axes = [a for a in range(3) if spec.grid[a] > 1]
    xk = {a: torch.cat([zeros, coords[a]]) for a in axes}
    if spec.window is not None:
        lo, hi = {}, {}
        for a in axes:
            l, h = box_range(coords[a], spec.grid[a], spec.window[a], spec.border)
            lo[a], hi[a] = torch.cat([zeros, l]), torch.cat([zeros, h])

        def mask_mod(b, h, qi, ki):
            ok = (qi < P) | (ki < P)
            inside = ki >= P
            for a in axes:
                x = xk[a][ki]
                inside = inside & (x >= lo[a][qi]) & (x <= hi[a][qi])
            return ok | inside
        return mask_mod
    r2 = spec.radius * spec.radius
    cen = {a: torch.cat([zeros, circle_center(coords[a], spec.grid[a], spec.radius, spec.border, spec.padded(a))])
           for a in axes}

    def mask_mod(b, h, qi, ki):
        ok = (qi < P) | (ki < P)
        d2 = None
        for a in axes:
            d = xk[a][ki] - cen[a][qi]
            d2 = d * d if d2 is None else d2 + d * d
        inside = (d2 < r2) if d2 is not None else (ki >= P)
        return ok | inside
    return mask_mod


def _prep_flex(state):
    if not state["device"].startswith("cuda"):
        raise Skip("GPU only")
    from torch.nn.attention.flex_attention import create_block_mask
    spec, S = state["spec"], state["spec"].seq_len
    mm = flex_mask_mod(spec, state["device"])
    t = time.perf_counter()
    with warnings.catch_warnings():   # torch >= 2.12 deprecates _compile (still works); 2.11 needs it
        warnings.simplefilter("ignore", DeprecationWarning)
        bm = create_block_mask(mm, None, None, S, S, device=state["device"], _compile=True)
    torch.cuda.synchronize()
    mask_s = time.perf_counter() - t
    flex = _flex_fn()
    qh, kh, vh, scale = state["qh"], state["kh"], state["vh"], state["scale"]

    def fn():
        return flex(qh, kh, vh, block_mask=bm, scale=scale).transpose(1, 2)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    info = {"mask_s": round(mask_s, 2), "first_call_s": round(time.perf_counter() - t, 2)}
    try:
        info["sparsity"] = round(float(bm.sparsity()), 1)
    except Exception:
        pass
    return Prepared(fn, info)


def _prep_naive(state):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    spec = state["spec"]
    S = spec.seq_len
    need = _dense_scores_bytes(state) + 9.0 * spec.num_grid ** 2 + S * S
    avail = _available_bytes(state["device"])
    if need > 0.5 * avail:
        raise Skip(f"memory: needs ~{_fmt_gib(need)}, {_fmt_gib(avail)} available")
    t = time.perf_counter()
    mask = window_mask(spec, 0, state["device"])
    if state["device"].startswith("cuda"):
        torch.cuda.synchronize()
    mask_s = time.perf_counter() - t
    qh, kh, vh, scale = state["qh"], state["kh"], state["vh"], state["scale"]

    def fn():
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(1, 2)
    return Prepared(fn, {"mask_s": round(mask_s, 3)})


def natten_geometry(shape: WindowShape):
    """(grid, kernel_size) of the NATTEN call equivalent to this case's window, size-1 grid axes
    dropped (NATTEN kernels are >= 2 on every axis); Skip with the reason when there is none."""
    if shape.radius is not None:
        raise Skip("circle window: NATTEN neighborhoods are boxes")
    if shape.border != "inward":
        raise Skip(f"border {shape.border!r}: NATTEN shifts windows inside at borders (inward only)")
    if shape.num_prefix:
        # additional_keys would give grid queries the prefix keys, but not prefix queries all keys
        raise Skip("prefix tokens: prefix queries attend to every key, not a NATTEN op")
    spec = shape.spec()
    axes = [a for a in range(3) if spec.grid[a] > 1]
    kernel = tuple(spec.window[a] for a in axes)     # -1 and oversized windows resolved to the axis
    if not axes or min(kernel) < 2:
        raise Skip("window 1 on an axis: NATTEN kernel sizes are >= 2")
    return tuple(spec.grid[a] for a in axes), kernel


def _prep_natten(state):
    grid, kernel = natten_geometry(state["shape"])
    try:
        import natten
        from natten.backends import choose_backend
    except ImportError:
        raise Skip("natten not installed")
    sh: WindowShape = state["shape"]
    B, _, H, D = state["q"].shape
    # NATTEN's layout, heads last with row-major tokens (B, *grid, H, D), made once here: the layout
    # a NATTEN model keeps, so this conversion is not timed (nor is the way back, in the check)
    inv = tile_permutation(sh.grid, sh.tile, state["device"])[1] if sh.tile else None
    q, k, v = (x if inv is None else x[:, inv] for x in (state["q"], state["k"], state["v"]))
    q, k, v = (x.reshape(B, *grid, H, D).contiguous() for x in (q, k, v))
    na = (natten.na1d, natten.na2d, natten.na3d)[len(grid) - 1]
    try:
        backend = choose_backend(q, k, v, torch_compile=False)
    except NotImplementedError as e:
        raise Skip(f"natten: {e}"[:160])
    # NATTEN runs Flex Attention where it has no kernel of its own (CPU, no libnatten): eager Flex
    # materialises every score, fine on the CPU set only, so on a GPU it is compiled (as the flex row)
    compiled = backend == "flex-fna" and state["device"].startswith("cuda")
    if compiled:
        natten.allow_flex_compile()
    scale = state["scale"]

    def fn():
        return na(q, k, v, kernel_size=kernel, scale=scale, backend=backend, torch_compile=compiled)
    with warnings.catch_warnings():   # eager Flex warns (once) that it is unfused: the backend note says so
        warnings.filterwarnings("ignore", message=".*without torch.compile")
        warnings.simplefilter("ignore", FutureWarning)
        info = first_call(fn, state["device"], "natten")
    if kernel == grid:
        info["backend"] = "attention (the window is the whole grid)"
    else:
        info["backend"] = backend + (f" {'compiled' if compiled else 'eager'}" if backend == "flex-fna" else "")
    return Prepared(fn, info)


def _natten_check(state, out):
    """The case's check, on NATTEN's output put back into the case's token order."""
    sh: WindowShape = state["shape"]
    out = out.flatten(1, out.dim() - 3)
    if sh.tile:
        out = out[:, tile_permutation(sh.grid, sh.tile, out.device)[0]]
    return check(state, out)


def _flex_cost_hint(shape: WindowShape) -> float:
    S = shape.spec().seq_len
    return min(30.0, 3.0 + S * S / 1.7e8)


# Rough dense rates (TFLOP/s, H100/H200 bf16) for --budget-s cost hints only; never reported.
_DENSE_RATE = {"cudnn": 550.0, "flash": 350.0, "efficient": 200.0, "math": 50.0}


def make_impls(shape: WindowShape, gpu: bool, slow_reps: int = 3):
    spec = shape.spec()
    S = spec.seq_len
    big = S > 100_000
    dense_flops = 4.0 * shape.B * shape.H * S * S * shape.D
    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True)]
    if gpu:
        impls.append(Impl("dtk-ws", _prep_dtk_ws, kind="dtk", check=True, devices=("cuda",),
                          note="grid queries by the warp-specialized single-loop engine "
                               "(window_engine=triton-single-loop)"))
    if shape.tile:
        impls.append(Impl("dtk+permute", _prep_dtk_permute, kind="dtk", check=True, checker=_permute_check,
                          note="row-major tokens in and out: to_tile_order(q, k, v) + op + from_tile_order, all timed"))
    for be in SDPA_BACKENDS:  # dense cuDNN first: the anchor every speedup is quoted against
        hint = (slow_reps + 2) * dense_flops / (_DENSE_RATE[be] * 1e12) if gpu else 0.0
        impls.append(Impl(f"sdpa-{be}", _sdpa_prep(be), slow=big, reuse_key=_sdpa_reuse_key(be),
                          cost_hint_s=hint, note="dense, no mask"))
        if be == "cudnn":  # then the peers with the same mask: FlexAttention (its mask build is timed apart), NATTEN
            if gpu:
                impls.append(Impl("flex", _prep_flex, check=True, devices=("cuda",), cost_hint_s=_flex_cost_hint(shape)))
            impls.append(Impl("natten", _prep_natten, check=True, checker=_natten_check,
                              note="NATTEN na{1,2,3}d, heads-last row-major layout (made once, not timed)"))
    impls.append(Impl("naive", _prep_naive, check=True, note="dense bool mask + SDPA math"))
    return impls


# ---------------------------------------------------------------------------------------------
# Cases

def make_setup(shape: WindowShape):
    def setup(device, dtype):
        spec = shape.spec()
        S = spec.seq_len
        gen = dict(device=device, dtype=dtype)
        # SDPA layout (B,H,S,D) tensors; the op gets their (B,S,H,D) transpose views (no copy).
        qh, kh, vh = (torch.randn(shape.B, shape.H, S, shape.D, **gen) for _ in range(3))
        return dict(shape=shape, spec=spec, device=device, dtype=dtype, qh=qh, kh=kh, vh=vh,
                    q=qh.transpose(1, 2), k=kh.transpose(1, 2), v=vh.transpose(1, 2),
                    scale=1.0 / math.sqrt(shape.D), rows=check_rows_for(spec, device))
    return setup


def make_work(shape: WindowShape, elem_bytes: int):
    def work():
        spec = shape.spec()
        flops = 4.0 * shape.B * shape.H * shape.D * pair_count(spec)
        nbytes = 4.0 * shape.B * spec.seq_len * shape.H * shape.D * elem_bytes   # q, k, v read; out written
        return flops, nbytes
    return work


def make_case(shape: WindowShape, gpu: bool) -> Case:
    dtype = "bfloat16" if gpu else "float32"
    params = {k: v for k, v in asdict(shape).items() if k not in ("name", "note") and v is not None}
    params["seq_len"] = shape.spec().seq_len
    return Case(op=OP, shape=shape.name, params=params, setup=make_setup(shape), impls=make_impls(shape, gpu),
                check=check, work=make_work(shape, 2 if gpu else 4), dtype=dtype, gpu=gpu, note=shape.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
