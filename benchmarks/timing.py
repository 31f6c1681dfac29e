"""Timers and the FLOP floor (the method: docs/benchmarks.md, "Timing").

GPU: `triton.testing.do_bench` (median; it clears the L2 cache before every rep), except for
calls that take ~100 ms or more (dense anchors on the big shapes), which are timed with CUDA
events over a few reps, the calls that found them slow serving as warmup.
CPU: a repeat timer with warmup (median of wall-clock times).
The FLOP floor is a GEMM measured in the same run: bf16 8192^3 on a GPU, fp32 on the CPU; the
bandwidth floor (for memory-bound ops) a device copy measured in the same run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch


def time_cpu(fn: Callable, *, warmup_s: float = 0.05, min_reps: int = 3, max_reps: int = 50,
             target_s: float = 0.3) -> Dict:
    """Median wall time (ms) of fn(): at least one warmup call (until warmup_s), then reps until
    target_s or max_reps, never fewer than min_reps."""
    t0 = time.perf_counter()
    fn()
    n_warm = 1
    while time.perf_counter() - t0 < warmup_s and n_warm < 20:
        fn()
        n_warm += 1
    times = []
    t_start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - t_start < target_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), reps=len(times), timer="cpu-median")


def time_cuda_events(fn: Callable, reps: int = 3, warmup: int = 1) -> Dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return dict(ms=statistics.median(times), reps=reps, timer="cuda-events-median")


def time_gpu(fn: Callable, *, slow: bool = False, slow_reps: int = 3, warmup_ms: int = 25, rep_ms: int = 100) -> Dict:
    """do_bench median for ordinary calls. Calls flagged slow by the case (dense anchors on the big
    shapes, already run once while preparing) get `slow_reps` CUDA-event reps and no warmup; a
    call measured >= 100 ms twice in a row (the first may include a compile) gets the same."""
    if slow:
        return time_cuda_events(fn, reps=slow_reps, warmup=0)
    firsts = []
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        firsts.append((time.perf_counter() - t) * 1e3)
        if firsts[-1] < 100:
            break
    if min(firsts) >= 100:
        r = time_cuda_events(fn, reps=slow_reps, warmup=0)
        r["first_ms"] = round(firsts[0], 3)
        return r
    from triton.testing import do_bench
    ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return dict(ms=float(ms), timer="do_bench-median", host_ms=host_time(fn))


def host_time(fn: Callable, reps: int = 5) -> float:
    """CPU time (ms) one call takes to enqueue its work, without waiting for the GPU: where it is
    close to the measured time, the row is bound by launch overhead, not by its kernels."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) * 1e3 / reps
    torch.cuda.synchronize()
    return host


def time_fn(fn: Callable, device: str, *, slow: bool = False, slow_reps: int = 3, cpu_target_s: float = 0.3) -> Dict:
    if device.startswith("cuda"):
        return time_gpu(fn, slow=slow, slow_reps=slow_reps)
    return time_cpu(fn, target_s=cpu_target_s, warmup_s=min(0.05, cpu_target_s / 4))


def measure_floor(device: str, n: Optional[int] = None, cpu_target_s: float = 0.3) -> Dict:
    """Peak-ish matrix-multiply rate of this device: the FLOP floor of every row is flops / rate."""
    if device.startswith("cuda"):
        n = n or 8192
        dtype = torch.bfloat16
    else:
        n = n or 1024
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    r = time_fn(lambda: a @ b, device, cpu_target_s=cpu_target_s)
    flops = 2.0 * n ** 3
    return dict(name=f"gemm {str(dtype).replace('torch.', '')} {n}^3", ms=r["ms"], tflops=tflops(flops, r["ms"]),
                dtype=str(dtype).replace("torch.", ""), n=n)


def measure_copy_bandwidth(device: str, nbytes: Optional[int] = None, cpu_target_s: float = 0.3) -> Dict:
    """Device-copy bandwidth (``y.copy_(x)``, read + write bytes / time): the floor of memory-bound
    ops (linear attention, layout); a row's ``% copy`` is its minimum traffic at this rate / time.
    1 GiB buffers on a GPU (the measured rates: benchmarks/RESULTS.md), 64 MiB on the CPU."""
    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 26)
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    r = time_fn(lambda: y.copy_(x), device, cpu_target_s=cpu_target_s)
    moved = 2.0 * x.numel() * 4
    return dict(name=f"copy {nbytes / 2 ** 20:.0f} MiB", ms=r["ms"], gbs=gbs(moved, r["ms"]), bytes=moved)


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def pct_of_bandwidth(nbytes: float, ms: float, copy_gbs: float) -> float:
    """Percent of the device-copy bandwidth: the bytes' time at the copy rate / measured time."""
    return 100.0 * gbs(nbytes, ms) / copy_gbs


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def pct_of_floor(flops: float, ms: float, floor_tflops: float) -> float:
    """Percent of the device's FLOP floor: floor time (flops at the GEMM rate) / measured time."""
    floor_ms = flops / (floor_tflops * 1e12) * 1e3
    return 100.0 * floor_ms / ms
