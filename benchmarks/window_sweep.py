"""Block-size and launch-configuration sweep of the window engine on a GPU: a tuning aid that tells
where the engine's time goes, not part of the suite (`results_md --log` adds its text output to
RESULTS.md).

For each shape it times the Triton engine at every (query block, key block) x (num_warps,
num_stages) candidate with autotuning off (for box windows also the default with the partial
blocks' scores tested one by one instead of masked by tensor-core dots: window_mask_by_dot; with a
prefix, the default with the prefix rows in the Triton kernel: window_prefix_by_dense; on Hopper,
the grid queries by the warp-specialized single-loop engine where it applies:
window_engine="triton-single-loop"; each through dtk.config), checks each variant's output against
the default variant's (a miscompiled configuration shows as a large difference), and prints
effective TFLOP/s.
The `dense-control` shape has a window covering the whole grid, so every plan entry is a full
block without any mask: its rate against SDPA (cuDNN, flash) on the same tensors is the engine's
raw attention speed, separate from plan waste and mask cost; against FlexAttention without a mask
and benchmarks/ws_probe.py (TMA loads, with and without Hopper warp specialization), what Triton
kernels reach on the card.

    python -m benchmarks.window_sweep                       # every shape below
    python -m benchmarks.window_sweep --shape na2d-* --json sweep.json
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import dtk
from dtk import _config
from dtk.ops.window import engine
from dtk.ops.window import triton as wt
from dtk.ops.window import triton_single_loop as single_loop
from dtk.ops.window.engine import window_attention_triton
from dtk.ops.window.plan import build_plan, engine_pairs
from dtk.ops.window.spec import pair_count
from dtk.ops.window.triton import launch_configs

from . import sweep_cli, ws_probe
from .cases.window import GPU_SHAPES, WindowShape
from .sweep_cli import timed_row

SHAPES = [WindowShape("dense-control-64x128", 1, 24, 128, (64, 128), window=(64, 128))] + [
    s for s in GPU_SHAPES if s.name in ("na2d-256-w64-tile8x16", "freeswim-1080p-tile21x3x2", "freeswim-1080p-tile7x2x8",
                                        "clear8k-r16-clip-p512-tile8x16", "flux4096-r16-clip-p512-tile8x16")] + [
    # 16x8 tiles make 8x8 query blocks at 64 rows: plan efficiency 0.709 at 64x64 blocks (0.678 with
    # 8x16 tiles); at the default 128x64 both are 0.636
    WindowShape("flux4096-r16-clip-p512-tile16x8", 1, 24, 128, (256, 256), radius=16, border="clip", num_prefix=512,
                tile=(16, 8))]
BLOCKS = [(128, 64), (128, 128), (64, 64), (128, 32)]


def _tensors(shape: WindowShape, device="cuda", dtype=torch.bfloat16):
    spec = shape.spec()
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape.B, spec.seq_len, shape.H, shape.D, device=device, dtype=dtype, generator=g)
               for _ in range(3))
    return spec, q, k, v


def _sdpa_rows(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def fn():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return fn


def _lazy(make):
    """A callable that builds the real one (`make()`) on its first call: a build error is then the
    variant's error row (timed_row), not the sweep's end, and the build is never timed."""
    fn = None

    def run():
        nonlocal fn
        if fn is None:
            fn = make()
        return fn()
    return run


def _flex_dense(q, k, v):
    from .cases.window import _flex_fn

    flex = _flex_fn()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: flex(qt, kt, vt).transpose(1, 2)


def sweep(shape: WindowShape, out: list, device="cuda", dtype=torch.bfloat16):
    spec, q, k, v = _tensors(shape, device, dtype)
    scale = 1.0 / math.sqrt(shape.D)
    flops = 4.0 * shape.B * shape.H * shape.D * pair_count(spec)
    rows = []

    def record(name, fn, ref=None):
        return timed_row(rows, shape.name, name, fn, ref, lambda ms: ("tflops", flops / ms / 1e9, "eff TFLOP/s"))

    bd = max(16, 1 << (shape.D - 1).bit_length())
    def default():
        return window_attention_triton(q, k, v, spec, scale, launch=launch_configs(bd)[0])
    ref = record("default", default)
    # the default with one engine setting flipped: boxes' partial-block masks by tensor-core dots
    # (else per-score tests); a prefix's rows by the dense kernel on a side stream (else Triton's own)
    for setting, applies in (("window_mask_by_dot", spec.window is not None),
                             ("window_prefix_by_dense", spec.num_prefix > 0)):
        if not applies:
            continue
        flipped = not _config.get(setting)

        def variant(setting=setting, flipped=flipped):
            with dtk.config(**{setting: flipped}):
                return default()
        record(f"default, {setting}={int(flipped)}", variant, ref)
    # the grid queries by the warp-specialized single-loop engine (64 x 64 blocks, 4 warps per
    # group), at 2, 3 and 4 pipeline stages (all within sm_90's shared memory, no spills), where it
    # serves: Hopper or later, or the interpreter (CPU tensors: the tests run these rows too)
    with dtk.config(window_engine="triton-single-loop"):
        single_loop_ok = engine.can_run_single_loop(q, k, v, spec, None)
    if single_loop_ok:
        for stages in (2, 3, 4):
            def run_single_loop(stages=stages):
                with dtk.config(window_engine="triton-single-loop"):
                    return window_attention_triton(q, k, v, spec, scale, launch=(single_loop.NUM_WARPS, stages))
            record(f"single-loop engine (window_engine=triton-single-loop, 64x64 w{single_loop.NUM_WARPS} "
                   f"s{stages}, warp-specialized)", run_single_loop, ref)
    for bq, bk in BLOCKS:
        eff = pair_count(spec) / engine_pairs(build_plan(spec, bq, bk, q.device), spec)
        print(f"{shape.name:34s} blocks {bq}x{bk}: plan efficiency {eff:.3f} (the mask's pairs / computed pairs)")
        rows.append(dict(shape=shape.name, variant=f"blocks {bq}x{bk}", plan_eff=eff))
        for warps, stages in wt.tuning_configs(bq, bd, bk):
            record(f"blocks {bq}x{bk} w{warps} s{stages}",
                   lambda: window_attention_triton(q, k, v, spec, scale, block=(bq, bk), launch=(warps, stages)), ref)
    if spec.window is not None and all(w >= n for w, n in zip(spec.window, spec.grid)):
        for backend in ("cudnn", "flash"):
            record(f"sdpa-{backend}", _sdpa_rows(q, k, v, backend), ref)
        # FlexAttention without a mask: a well-tuned Triton attention kernel on the same tensors,
        # so the engine's raw rate can be told apart from Triton's own ceiling on this card
        record("flex (dense, Triton)", _lazy(lambda: _flex_dense(q, k, v)), ref)
        # plain Triton attention with TMA loads, without and with Hopper warp specialization
        for name, ws, indexed, bm, bn, warps, stages in ws_probe.VARIANTS:
            record(f"probe: {name} (dense, Triton, {bm}x{bn} w{warps} s{stages})",
                   _lazy(lambda: ws_probe.probe_fn(q, k, v, scale, ws, indexed, bm, bn, warps, stages)), ref)
    out.extend(rows)


def main(argv=None):
    return sweep_cli.main(argv, __doc__, "window_sweep", SHAPES, sweep)


if __name__ == "__main__":
    sys.exit(main())
