"""Launch-configuration sweep of the linear-attention forward on a GPU: a tuning aid that tells
where the forward's time goes, not part of the suite (its numbers do not go to RESULTS.md).

For each shape it times, with autotuning off: the state kernel (reads k, v) and the apply kernel
(reads q, writes o) alone at every configuration their launchers may choose, both ways each can
reduce (``STATE_KS_BY_DOT``, ``APPLY_DEN_BY_DOT``), the whole op as shipped (autotuned), and a device
copy of the same bytes (the bandwidth floor). Each variant's output is compared with the default
variant's (a miscompiled configuration shows as a large difference); GB/s count the minimum
traffic (each input read once, the output written once).

    python -m benchmarks.linear_sweep                       # every shape below
    python -m benchmarks.linear_sweep --shape flux4k-* --json lsweep.json
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from contextlib import contextmanager

import torch

from dtk.ops.linear import triton as lt

from .cases.linear import GPU_SHAPES

SHAPES = [s for s in GPU_SHAPES if s.name in ("flux4k-S66048-H24-d128", "sd15-4096-256x256-d80")]


@contextmanager
def _forced(kernel, cfg):
    """launch_configs returns only `cfg` for `kernel` (autotuning off), the real list otherwise."""
    real = lt.launch_configs
    lt.launch_configs = lambda name, *a, **kw: [cfg] if name == kernel else real(name, *a, **kw)
    try:
        yield
    finally:
        lt.launch_configs = real


def sweep(shape, out: list):
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape.B, shape.S, shape.H, shape.D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    half = q.numel() * q.element_size() * 2          # one kernel's traffic: two (B, S, H, D) tensors
    rows = []

    def record(name, fn, nbytes, ref=None):
        try:
            o = fn()
            o = o[0] if isinstance(o, tuple) else o
            err = float((o.float() - ref.float()).abs().max()) if ref is not None else 0.0
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a configuration the card cannot launch: reported, the sweep goes on
            rows.append(dict(shape=shape.name, variant=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
            print(f"{shape.name:26s} {name:40s} failed: {rows[-1]['error']}", flush=True)
            return None
        rows.append(dict(shape=shape.name, variant=name, ms=ms, gbs=nbytes / ms / 1e6, max_diff_vs_default=err))
        print(f"{shape.name:26s} {name:40s} {ms:8.4f} ms {nbytes / ms / 1e6:7.0f} GB/s  diff {err:.2e}", flush=True)
        return o

    src = q.clone()
    record("copy (same bytes as one kernel)", lambda: src.copy_(q), half)
    ref = record("op as shipped (autotuned)", lambda: lt.linear_attention_triton(q, k, v), 2 * half)
    state = lt.linear_attention_state_triton(k, v)

    def state_fn():   # both sums of the state, compared with the default's
        kv, ks, _ = lt.linear_attention_state_triton(k, v)
        return torch.cat([kv.flatten(), ks.flatten()])
    ref_state = state_fn()
    default_ks = lt.STATE_KS_BY_DOT
    try:
        for ks_dot in (True, False):
            lt.STATE_KS_BY_DOT = ks_dot
            for cfg in lt.launch_configs("state", shape.D, shape.D, q.dtype):
                with _forced("state", cfg):
                    record(f"state ks_dot={int(ks_dot)} {cfg['BLOCK_S']} w{cfg['num_warps']} s{cfg['num_stages']}",
                           state_fn, half, ref_state)
    finally:
        lt.STATE_KS_BY_DOT = default_ks
    default_den = lt.APPLY_DEN_BY_DOT
    try:
        for den_dot in (True, False):
            lt.APPLY_DEN_BY_DOT = den_dot
            for cfg in lt.launch_configs("apply", shape.D, shape.D, q.dtype):
                with _forced("apply", cfg):
                    record(f"apply den_dot={int(den_dot)} {cfg['BLOCK_M']} w{cfg['num_warps']} s{cfg['num_stages']}",
                           lambda: lt.linear_attention_apply_triton(q, *state), half, ref)
    finally:
        lt.APPLY_DEN_BY_DOT = default_den
    out.extend(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="shape name or glob (repeatable); default all")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    unmatched = [p for p in args.shape or [] if not any(fnmatch.fnmatch(s.name, p) for s in SHAPES)]
    if unmatched:
        ap.error(f"--shape {', '.join(unmatched)} matches none of: {', '.join(s.name for s in SHAPES)}")
    if not torch.cuda.is_available():
        print("linear_sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [s for s in SHAPES if not args.shape or any(fnmatch.fnmatch(s.name, p) for p in args.shape)]
    rows: list = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for s in shapes:
        sweep(s, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
