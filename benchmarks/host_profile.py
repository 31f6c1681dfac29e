"""Where the host time of a dtk call goes: cProfile over repeated calls of a benchmark case's dtk
row, the device synchronised once at the end (a diagnostic, not part of the suite). Rows whose
`host_ms` note is close to their time are bound by this overhead, not by their kernels.

    python -m benchmarks.host_profile --op linear --shape sd15-512-64x64-d40        # GPU set
    python -m benchmarks.host_profile --cpu --op linear --shape linfusion-S1024-H4-d64
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from . import registry


def profile_case(case: registry.Case, device: str, calls: int = 50, top: int = 25) -> str:
    """The dtk row's host ms per call and its cProfile table (top functions by cumulative time)."""
    dtk = [i for i in case.impls if i.kind == "dtk" and device.split(":")[0] in i.devices]
    if not dtk:
        return f"{case.op} {case.shape}: no dtk row for {device}\n"
    dtype = getattr(torch, case.dtype)
    prep = dtk[0].prepare(case.setup(device, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):  # compiles and autotunes outside the profile
        prep.fn()
    sync()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        prep.fn()
    prof.disable()
    host = (time.perf_counter() - t) * 1e3 / calls
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return f"{case.op} {case.shape} {dtk[0].name}: {host:.3f} ms host per call (profiled)\n{text.getvalue()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="append", help="op family (repeatable); default all")
    ap.add_argument("--shape", action="append", help="shape name or glob (repeatable); default all")
    ap.add_argument("--cpu", action="store_true", help="the CPU set on the CPU (default: the GPU set on cuda)")
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args(argv)
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("host_profile needs a CUDA GPU (or --cpu)", file=sys.stderr)
        return 2
    cases = registry.select(gpu, args.op, args.shape)
    if not cases:
        ap.error("no case matches --op / --shape")
    for case in cases:
        try:
            print(profile_case(case, "cuda" if gpu else "cpu", args.calls), flush=True)
        except registry.Skip as e:
            print(f"{case.op} {case.shape}: skipped ({e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
