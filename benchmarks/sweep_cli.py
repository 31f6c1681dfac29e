"""What the GPU tuning sweeps (window_sweep, linear_sweep) share: their command line (shape globs,
JSON of the rows) and the timing of one checked variant."""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import Callable, List, Optional


def bench(fn) -> float:
    """Median ms of fn on the GPU (tests replace it to run a sweep on the CPU)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def timed_row(rows: List[dict], shape: str, name: str, fn: Callable, ref=None,
              rate: Callable[[float], tuple] = lambda ms: ()) -> Optional[object]:
    """Runs `fn` once (its output compared with `ref`, the default variant's), times it and appends
    a row; `rate(ms)` gives (key, value, unit) for the row's rate (eff TFLOP/s, GB/s). A variant the
    card cannot launch is a row with its error, and the sweep goes on. Returns the output."""
    try:
        o = fn()
        o = o[0] if isinstance(o, tuple) else o
        err = float((o.float() - ref.float()).abs().max()) if ref is not None else 0.0
        ms = bench(fn)
    except Exception as e:
        rows.append(dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
        print(f"{shape:34s} {name:40s} failed: {rows[-1]['error']}", flush=True)
        return None
    key, value, unit = rate(ms) or (None, None, "")
    rows.append(dict(shape=shape, variant=name, ms=ms, max_diff_vs_default=err, **({key: value} if key else {})))
    shown = f"{value:8.1f} {unit}" if key else ""
    print(f"{shape:34s} {name:40s} {ms:9.4f} ms {shown}  diff {err:.2e}", flush=True)
    return o


def kernel_times(fn: Callable, reps: int = 3) -> List[tuple]:
    """(kernel name, ms per call) of every GPU kernel fn launches, by torch.profiler over `reps`
    calls after a warm one, longest first: where a multi-kernel op's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:   # older torch
            us = getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, us / 1e3 / reps))
    return sorted(rows, key=lambda r: -r[1])


def main(argv, doc: str, tool: str, shapes: list, sweep: Callable[[object, list], None]) -> int:
    """`python -m benchmarks.<tool> [--shape GLOB] [--json FILE]`: runs `sweep(shape, rows)` for
    each selected shape (GPU only), rewriting the JSON after each."""
    import torch
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{tool}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="shape name or glob (repeatable); default all")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    unmatched = [p for p in args.shape or [] if not any(fnmatch.fnmatch(s.name, p) for s in shapes)]
    if unmatched:
        ap.error(f"--shape {', '.join(unmatched)} matches none of: {', '.join(s.name for s in shapes)}")
    if not torch.cuda.is_available():
        print(f"{tool} needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for s in shapes:
        if args.shape and not any(fnmatch.fnmatch(s.name, p) for p in args.shape):
            continue
        sweep(s, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0
