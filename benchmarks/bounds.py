"""Lower bounds on the window-attention targets of issue 2, from exact work counts (CPU only).

A block-sparse engine computes whole (query block x key block) tiles: its tensor-core work is the
plan's pairs (`engine_pairs`), not the mask's (`pair_count`). At the card's GEMM rate (measured in
a benchmark run, read from its JSON) that work takes at least `computed / floor`; a target time T
then needs the kernel to run at `computed / (T x floor)` of the GEMM rate. This prints, per
target and layout tile (row-major, the benchmark's, dtk.suggest_tile's) and block shape, the
plan efficiency (mask pairs / computed pairs) and that required fraction. Over 100% means no
kernel consuming such a plan can meet the target on that card; for scale, dense cuDNN attention's
own share of the GEMM rate is its rows' dense_tflops in benchmarks/RESULTS.md. Method:
docs/benchmarks.md ("How far a block-sparse kernel can go").

    python -m benchmarks.bounds                          # the newest stored H200 run with dense window anchors
    python -m benchmarks.bounds --json bench.json        # another run's floor and dense anchors
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from dtk.ops.layout import suggest_tile
from dtk.ops.window.plan import build_plan, engine_pairs
from dtk.ops.window.spec import make_spec, pair_count
from dtk.ops.window.engine import default_blocks


@dataclass(frozen=True)
class Target:
    name: str
    H: int
    D: int
    grid: Tuple[int, ...]
    window: Optional[Tuple[int, ...]]
    radius: Optional[int]
    border: str
    num_prefix: int
    bench_tile: Tuple[int, ...]
    ms: Optional[float] = None          # an absolute target
    vs_dense: Optional[float] = None    # or: this many times faster than dense cuDNN (measured)
    dense_prefix: str = ""              # benchmark shapes whose sdpa-cudnn row is that dense time


TARGETS = [
    Target("2D inward 64x64 window, 256x256 grid", 24, 128, (256, 256), (64, 64), None, "inward", 0, (8, 16),
           ms=6.0),
    Target("FreeSwim 1080p (21x68x120, window (-1,31,53))", 12, 128, (21, 68, 120), (-1, 31, 53), None, "inward",
           0, (7, 2, 8), vs_dense=5.0, dense_prefix="freeswim-1080p"),
    Target("CLEAR 8K (512x512, r=16, 512 text)", 24, 128, (512, 512), None, 16, "clip", 512, (8, 16),
           vs_dense=100.0, dense_prefix="clear8k"),
]


def _run_json(path: Optional[str]) -> dict:
    if path is not None:
        with open(path) as f:
            data = json.load(f)
        data["_path"] = path
        return data
    # the newest stored run that timed the dense cuDNN anchors of the window shapes
    for path in sorted(glob.glob("benchmarks/results/h200-*.json"), reverse=True):
        with open(path) as f:
            data = json.load(f)
        if any(_dense_ms(data, t.dense_prefix) for t in TARGETS if t.dense_prefix):
            data["_path"] = path
            return data
    raise SystemExit("no benchmarks/results/h200-*.json with window sdpa-cudnn rows: give --json")


def _dense_ms(data: dict, prefix: str) -> Optional[float]:
    for r in data.get("rows", []):
        if r.get("op") == "window" and r.get("impl") == "sdpa-cudnn" and r["shape"].startswith(prefix) and r.get("ms"):
            return float(r["ms"])
    return None


def bounds(t: Target, floor_tflops: float, target_ms: float) -> List[dict]:
    """One row per (tile, blocks): plan efficiency and the share of the GEMM rate the target needs."""
    cpu = torch.device("cpu")
    tiles = [None, t.bench_tile, suggest_tile(t.grid, t.window, radius=t.radius)]
    rows = []
    for tile in dict.fromkeys(tiles):
        spec = make_spec(t.grid, t.window, t.radius, t.border, t.num_prefix, tile)
        need = 4.0 * t.H * t.D * pair_count(spec)
        for blocks in dict.fromkeys([default_blocks(torch.device("cuda"), t.D, spec), (64, 64)]):
            done = 4.0 * t.H * t.D * engine_pairs(build_plan(spec, *blocks, cpu), spec)
            rows.append(dict(target=t.name, tile=tile, blocks=blocks, plan_eff=need / done,
                             need_tflop=need / 1e12, computed_tflop=done / 1e12,
                             ms_at_floor=done / (floor_tflops * 1e9), target_ms=target_ms,
                             required_pct_of_floor=100.0 * done / (target_ms * floor_tflops * 1e9)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="a `python -m benchmarks --gpu --json` run: its GEMM floor and dense anchors")
    args = ap.parse_args(argv)
    data = _run_json(args.json)
    floor = data["meta"]["floor"]["tflops"]
    print(f"{data['meta'].get('card')}: GEMM floor {floor:.4g} TFLOP/s ({data['_path']})")
    print(f"{'target':48s} {'tile':>12s} {'blocks':>10s} {'plan eff':>8s} {'ms @ floor':>10s} "
          f"{'target ms':>9s} {'needs % of floor':>16s}")
    for t in TARGETS:
        target_ms = t.ms
        if target_ms is None:
            dense = _dense_ms(data, t.dense_prefix)
            if dense is None:
                print(f"{t.name:48s} no dense cuDNN time in the run")
                continue
            target_ms = dense / t.vs_dense
        for r in bounds(t, floor, target_ms):
            tile = "row-major" if r["tile"] is None else "x".join(map(str, r["tile"]))
            print(f"{r['target']:48s} {tile:>12s} {'x'.join(map(str, r['blocks'])):>10s} {r['plan_eff']:8.3f} "
                  f"{r['ms_at_floor']:10.2f} {r['target_ms']:9.2f} {r['required_pct_of_floor']:15.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
