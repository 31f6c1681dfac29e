"""Launch-configuration sweep of the linear-attention forward on a GPU: a tuning aid that tells
where the forward's time goes, not part of the suite (`results_md --log` adds its text output to
RESULTS.md).

For each linear-attention shape it times, with autotuning off: the state kernel (reads k, v) and
the apply kernel (reads q, writes o) alone at every configuration their launchers may choose, both
ways each can reduce (settings ``linear_state_ks_by_dot``, ``linear_apply_den_by_dot``), the whole
op as shipped (autotuned) at 1, 2 and 4 programs per SM (``linear_programs_per_sm``), each with the
chunks' sums combined by atomics or by slots and a torch sum (``linear_state_atomic``), the backward
with whole-tile kernels against the wide ones (``backward_whole_tiles``) with each backward
kernel's time (torch.profiler), and a device copy of the same bytes (the bandwidth floor). Each
variant's output is compared with the default variant's (a miscompiled configuration
shows as a large difference); GB/s count the minimum traffic (each input read once, the output
written once). For MEMO's clip step it times the default launch against ``MEMO_STEP_VARIANTS``
(several clips per program). The settings are set in ``dtk.config`` scopes; the calls go through
the families' engine modules, as the ops' CUDA kernels do.

    python -m benchmarks.linear_sweep                       # every shape below
    python -m benchmarks.linear_sweep --shape flux4k-* --json lsweep.json
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

import dtk
from dtk.ops.linear import engine as le
from dtk.ops.linear import launch as lt
from dtk.ops.memo import engine as me

from . import sweep_cli
from .cases.linear import GPU_SHAPES
from .sweep_cli import timed_row

SHAPES = [s for s in GPU_SHAPES if s.name in ("flux4k-S66048-H24-d128", "sd15-4096-256x256-d80", "memo-32768x16-d40")]


@contextmanager
def _forced(kernel, cfg):
    """launch_configs returns only `cfg` for `kernel` (autotuning off), the real list otherwise (the
    engine reads launch.launch_configs at each call)."""
    real = lt.launch_configs
    lt.launch_configs = lambda name, *a, **kw: [cfg] if name == kernel else real(name, *a, **kw)
    try:
        yield
    finally:
        lt.launch_configs = real


def sweep_memo(shape, out: list, device="cuda", dtype=torch.bfloat16):
    """MEMO's clip step (output + memory update in one kernel): the default launch against
    MEMO_STEP_VARIANTS (several clips per program, loads prefetched a clip ahead)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape.B, shape.S, shape.H, shape.D, device=device, dtype=dtype, generator=g)
               for _ in range(3))
    mkv = torch.rand(shape.B, shape.H, shape.D, shape.D, device=device, generator=g)
    mz = torch.rand(shape.B, shape.H, shape.D, device=device, generator=g)
    nbytes = 4 * q.numel() * q.element_size() + 2 * (mkv.numel() + mz.numel()) * 4   # q k v o, memory in + out
    rows = []

    def record(name, fn, ref=None):
        return timed_row(rows, shape.name, name, fn, ref, lambda ms: ("gbs", nbytes / ms / 1e6, "GB/s"))

    def step(cfg=None):
        out, nkv, nz = me.memory_linear_attention_step(q, k, v, mkv, mz, 0.9, cfg=cfg)
        return torch.cat([out.float().flatten(), nkv.flatten(), nz.flatten()])
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    record("copy (same bytes)", lambda: dst.copy_(src))
    ref = record("memory_step default", step)
    base = me.launch_config("memory_step", shape.D, shape.D, frames=shape.S)
    for clips, warps, stages in me.MEMO_STEP_VARIANTS:
        cfg = dict(base, CLIPS=clips, num_warps=warps, num_stages=stages)
        record(f"memory_step clips={clips} w{warps} s{stages}", lambda cfg=cfg: step(cfg), ref)
    out.extend(rows)


def sweep(shape, out: list, device="cuda", dtype=torch.bfloat16):
    if shape.kind == "memo":
        return sweep_memo(shape, out, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape.B, shape.S, shape.H, shape.D, device=device, dtype=dtype, generator=g)
               for _ in range(3))
    half = q.numel() * q.element_size() * 2          # one kernel's traffic: two (B, S, H, D) tensors
    rows = []

    def record(name, fn, nbytes, ref=None):
        return timed_row(rows, shape.name, name, fn, ref, lambda ms: ("gbs", nbytes / ms / 1e6, "GB/s"))

    src = q.clone()
    record("copy (same bytes as one kernel)", lambda: src.copy_(q), half)
    out_ref = record("op as shipped (autotuned)", lambda: le.linear_attention(q, k, v), 2 * half)
    state = le.linear_attention_state(k, v)

    def state_fn():   # both sums of the state, compared with the default's
        kv, ks, _ = le.linear_attention_state(k, v)
        return torch.cat([kv.flatten(), ks.flatten()])

    def apply_fn():
        return le.linear_attention_apply(q, *state)
    # each kernel alone: both ways it reduces, every launch configuration its launcher may choose
    # (the row names keep the former switch names)
    for kernel, flag, setting, fn, ref in (
            ("state", "STATE_KS_BY_DOT", "linear_state_ks_by_dot", state_fn, state_fn()),
            ("apply", "APPLY_DEN_BY_DOT", "linear_apply_den_by_dot", apply_fn, out_ref)):
        for on in (True, False):
            with dtk.config(**{setting: on}):
                for cfg in lt.launch_configs(kernel, shape.D, shape.D, q.dtype):
                    with _forced(kernel, cfg):
                        record(f"{kernel} {flag}={int(on)} {cfg[lt.ROW_NAME[kernel]]} w{cfg['num_warps']}"
                               f" s{cfg['num_stages']}", fn, half, ref)
    # how finely the sequence is split (the state kernel's atomics against parallelism), and how
    # the chunks' sums combine (atomics, or slots and a torch sum)
    for per_sm in (1, 2, 4):
        for combine in (True, False):
            with dtk.config(linear_programs_per_sm=per_sm, linear_state_atomic=combine):
                record(f"op as shipped, PROGRAMS_PER_SM={per_sm}, STATE_ATOMIC={int(combine)}",
                       lambda: le.linear_attention(q, k, v), 2 * half, out_ref)
    # the backward: whole D x Dv tiles (one q-side pass; at D = 128 its sm_90a build spills inside
    # the loop) against the wide kernels (three q-side passes, Dv blocks, no spills), when both serve
    if lt.backward_whole_tiles(shape.D, shape.D):
        g = torch.randn_like(q)

        def backward(wide=False):
            return torch.cat([x.flatten() for x in le.linear_attention_backward(g, q, k, v, wide=wide)])
        # traffic: q k v g read, dq dk dv written, once each
        ref = record("backward whole tiles", backward, 4 * half)
        _kernel_rows(shape.name, "backward whole tiles", backward, rows)
        record("backward wide kernels", lambda: backward(True), 4 * half, ref)
        _kernel_rows(shape.name, "backward wide kernels", lambda: backward(True), rows)
    out.extend(rows)


def _kernel_rows(shape: str, name: str, fn, rows: list):
    """Each kernel of a multi-kernel variant with its share of the time (torch.profiler)."""
    try:
        times = sweep_cli.kernel_times(fn)
    except Exception as e:   # a profiler the machine lacks: the variant's own row stands
        print(f"{shape:34s} {name}: no kernel breakdown ({type(e).__name__}: {str(e)[:80]})", flush=True)
        return
    for kernel, ms in times:
        rows.append(dict(shape=shape, variant=f"{name}: {kernel}", ms=ms))
        print(f"{shape:34s} {name + ': ' + kernel[:60]:40s} {ms:9.4f} ms  (profiler)", flush=True)


def main(argv=None):
    return sweep_cli.main(argv, __doc__, "linear_sweep", SHAPES, sweep)


if __name__ == "__main__":
    sys.exit(main())
