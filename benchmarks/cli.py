"""`python -m benchmarks`: run the registered cases, print a table, write JSON / PNG, compare runs."""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from . import registry
from .registry import Case, Impl, Skip
from .results_md import fmt, row_notes
from .timing import gbs, measure_copy_bandwidth, measure_floor, pct_of_bandwidth, pct_of_floor, tflops, time_fn

SCHEMA = "dtk-bench/1"


# ---------------------------------------------------------------------------------------------
# progress

class _SimpleBar:
    def __init__(self, total, stream):
        self.total, self.n, self.stream, self.t0 = total, 0, stream, time.perf_counter()

    def set_description(self, text):
        self.text = text
        self.stream.write(f"[{self.n + 1}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {text}\n")
        self.stream.flush()

    def update(self, k=1):
        self.n += k

    def close(self):
        pass


def progress(total: int, enabled: bool = True):
    if not enabled:
        return _SimpleBar(total, open(os.devnull, "w"))
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _SimpleBar(total, sys.stderr)


# ---------------------------------------------------------------------------------------------
# environment

def environment(device: str, argv: List[str]) -> Dict[str, Any]:
    meta = dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        cuda=torch.version.cuda, device=device,
        command="python -m benchmarks " + " ".join(shlex.quote(a) for a in argv),
        argv=list(argv), cpu_threads=torch.get_num_threads(),
    )
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if device.startswith("cuda"):
        meta["card"] = torch.cuda.get_device_name()
        meta["cudnn"] = torch.backends.cudnn.version()
        p = torch.cuda.get_device_properties(0)
        meta["sms"] = p.multi_processor_count
        meta["gpu_mem_gib"] = round(p.total_memory / 2 ** 30, 1)
    else:
        meta["card"] = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    try:
        import subprocess
        meta["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except Exception:
        meta["git"] = None
    meta["git"] = meta["git"] or os.environ.get("DTK_GIT_COMMIT")   # a machine given the tree without .git
    return meta


# ---------------------------------------------------------------------------------------------
# running

class Runner:
    def __init__(self, device: str, floor: Dict, *, budget_s: Optional[float] = None,
                 skip_anchors: Optional[List[str]] = None, slow_reps: int = 3, bar=None, log=print,
                 cpu_target_s: float = 0.3, copy_floor: Optional[Dict] = None):
        self.device, self.floor = device, floor
        self.copy_floor = copy_floor    # measure_copy_bandwidth(): rows get pct_bw (% of copy GB/s)
        self.budget_s, self.t0 = budget_s, time.perf_counter()
        self.skip_anchors = skip_anchors or []
        self.slow_reps = slow_reps
        self.cpu_target_s = cpu_target_s
        self.bar = bar
        self.log = log
        self.reuse: Dict[tuple, Dict] = {}
        self.budget_hit = False

    def elapsed(self):
        return time.perf_counter() - self.t0

    def _skip_reason(self, impl: Impl, op: str = "") -> Optional[str]:
        if self.device.split(":")[0] not in impl.devices:
            return f"{'/'.join(impl.devices)} only"
        if impl.kind == "dtk":
            return None
        if any(fnmatch.fnmatchcase(impl.name, p) or fnmatch.fnmatchcase(f"{op}/{impl.name}", p)
               for p in self.skip_anchors):
            return "--skip-anchor"
        if self.budget_s is not None:
            el = self.elapsed()
            if el > self.budget_s:
                if not self.budget_hit:
                    self.log(f"# --budget-s {self.budget_s:g} exceeded after {el:.0f} s: skipping the remaining anchors")
                self.budget_hit = True
                return f"budget: --budget-s {self.budget_s:g} exceeded"
            if impl.cost_hint_s and el + impl.cost_hint_s > self.budget_s:
                return f"budget: needs ~{impl.cost_hint_s:.0f} s, {self.budget_s - el:.0f} s left"
        return None

    def run_case(self, case: Case, dtype) -> List[Dict]:
        rows = []
        base = dict(op=case.op, shape=case.shape, dtype=case.dtype)
        try:
            flops, nbytes = case.flops, case.bytes
            state = case.setup(self.device, dtype)
        except Exception as e:
            for impl in case.impls:
                rows.append(dict(base, impl=impl.name, kind=impl.kind, status="error", reason=f"setup: {e!r}"[:200]))
                if self.bar:
                    self.bar.update()
            return rows
        for impl in case.impls:
            if self.bar:
                self.bar.set_description(f"{case.shape} {impl.name}")
            row = dict(base, impl=impl.name, kind=impl.kind, flops=flops, bytes=nbytes)
            if impl.note:
                row["note"] = impl.note
            try:
                self._run_impl(case, impl, state, row)
            except Exception as e:  # never lose the run for one row
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:200])
            finally:
                if self.device.startswith("cuda"):
                    try:
                        torch.cuda.synchronize()
                    except Exception as e:  # a sticky CUDA error: every later row will say so too
                        row.setdefault("reason", f"after row: {e!r}"[:200])
            rows.append(row)
            if self.bar:
                self.bar.update()
        del state
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        add_speedups(rows)
        return rows

    def _run_impl(self, case: Case, impl: Impl, state, row):
        reason = self._skip_reason(impl, case.op)
        if reason:
            row.update(status="skipped", reason=reason)
            return
        key = impl.reuse_key(state) if impl.reuse_key else None
        if key is not None and key in self.reuse:
            prev = self.reuse[key]
            row.update(status=prev["status"], reason=prev.get("reason"), info=dict(prev.get("info", {}), reused_from=prev["shape"]))
            if "ms" in prev:
                self._fill_time(row, prev["ms"], prev.get("timer"), prev.get("reps"))
            return
        try:
            prep = impl.prepare(state)
        except Skip as e:
            row.update(status="skipped", reason=str(e))
            if key is not None:
                self.reuse[key] = dict(row)
            return
        row["info"] = dict(prep.info)
        if impl.check or impl.kind == "dtk":
            res = (impl.checker or case.check)(state, prep.fn())
            row["check"] = res.as_dict()
            if not res.ok:
                row.update(status="FAILED", reason=f"wrong result: err {res.err:.3g} > tol {res.tol:.3g} ({res.against})")
                return
        t = time_fn(prep.fn, self.device, slow=impl.slow, slow_reps=self.slow_reps,
                    cpu_target_s=self.cpu_target_s)
        row["status"] = "ok"
        self._fill_time(row, t["ms"], t.get("timer"), t.get("reps"))
        if t.get("host_ms") is not None:
            row["info"]["host_ms"] = round(t["host_ms"], 3)
        if key is not None:
            self.reuse[key] = dict(row)

    def _fill_time(self, row, ms, timer=None, reps=None):
        row["ms"] = ms
        row["timer"] = timer
        if reps:
            row["reps"] = reps
        row["tflops"] = tflops(row["flops"], ms)
        row["pct_floor"] = pct_of_floor(row["flops"], ms, self.floor["tflops"])
        row["gbs"] = gbs(row["bytes"], ms)
        if self.copy_floor and row["bytes"]:
            row["pct_bw"] = pct_of_bandwidth(row["bytes"], ms, self.copy_floor["gbs"])
        dense = row.get("info", {}).get("dense_flops")
        if dense:
            row.setdefault("info", {})["dense_tflops"] = round(tflops(dense, ms), 1)


def add_speedups(rows: List[Dict]):
    """Anchor rows get dtk_speedup = anchor ms / dtk ms (the fastest dtk row of the shape, named in
    speedup_vs); that dtk row gets speedup {anchor: ratio}."""
    dtk = [r for r in rows if r.get("kind") == "dtk" and r.get("status") == "ok"]
    if not dtk:
        return
    d = min(dtk, key=lambda r: r["ms"])
    sp = {}
    for r in rows:
        if r.get("kind") == "anchor" and r.get("status") == "ok":
            r["dtk_speedup"] = r["ms"] / d["ms"]
            r["speedup_vs"] = d["impl"]
            sp[r["impl"]] = r["dtk_speedup"]
    d["speedup"] = sp


# ---------------------------------------------------------------------------------------------
# output

def format_table(rows: List[Dict]) -> str:
    head = ["op", "shape", "impl", "ms", "eff TFLOP/s", "% floor", "dtk x", "GB/s", "% copy", "notes"]
    body = []
    for r in rows:
        body.append([r.get("op", ""), r["shape"], r["impl"], fmt(r.get("ms"), ".3f"), fmt(r.get("tflops"), ".3g"),
                     fmt(r.get("pct_floor"), ".1f"), fmt(r.get("dtk_speedup"), ".2f"),
                     fmt(r.get("gbs"), ".4g"), fmt(r.get("pct_bw"), ".1f"), row_notes(r, markdown=False)])
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    w[-1] = len(head[-1])
    last = len(head) - 1
    line = lambda cells: "  ".join(c.ljust(w[i]) if i < 3 or i == last else c.rjust(w[i]) for i, c in enumerate(cells)).rstrip()
    out = [line(head), line(["-" * x for x in w])]
    prev = None
    for b in body:
        if prev is not None and b[:2] != prev:
            out.append("")
        prev = b[:2]
        out.append(line(b))
    return "\n".join(out)


def _clean(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


def write_json(path: str, data: Dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=1)
    os.replace(tmp, path)


def load_json(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file (schema={data.get('schema')!r})")
    return data


def compare(new: Dict, old: Dict) -> str:
    """Per-row time ratio new/old for rows timed in both runs (< 1: faster now)."""
    key = lambda r: (r["op"], r["shape"], r["impl"])
    old_rows = {key(r): r for r in old["rows"] if r.get("ms")}
    lines = []
    mo, mn = old.get("meta", {}), new.get("meta", {})
    lines.append(f"compare: new {mn.get('card')} {mn.get('date')}  vs  old {mo.get('card')} {mo.get('date')}")
    if mo.get("card") != mn.get("card"):
        lines.append("warning: different devices, ratios compare cards, not code")
    lines.append(f"{'shape':<34} {'impl':<16} {'old ms':>10} {'new ms':>10} {'new/old':>8}")
    n = 0
    for r in new["rows"]:
        o = old_rows.get(key(r))
        if o is None or not r.get("ms"):
            continue
        ratio = r["ms"] / o["ms"]
        flag = "  faster" if ratio < 0.95 else ("  SLOWER" if ratio > 1.05 else "")
        lines.append(f"{r['shape']:<34} {r['impl']:<16} {o['ms']:>10.3f} {r['ms']:>10.3f} {ratio:>8.3f}{flag}")
        n += 1
    if n == 0:
        lines.append("(no row timed in both runs)")
    return "\n".join(lines)


def sequence_length(params: Dict) -> Optional[int]:
    """A case's sequence length (tokens attended over) from its parameters, per op family."""
    if params.get("seq_len"):
        return int(params["seq_len"])
    if params.get("S"):
        return int(params["S"])
    if params.get("lens"):
        return int(sum(params["lens"]))
    if params.get("grid"):
        return int(math.prod(params["grid"]) + params.get("text", 0))
    return None


def plot(data: Dict, path: str):
    """One panel per op: dtk's speedup over each anchor against the sequence length (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = data.get("meta", {}).get("cases", {})
    rows = [r for r in data["rows"] if r.get("dtk_speedup")]
    ops = list(dict.fromkeys(r["op"] for r in data["rows"]))
    cols = min(3, max(1, len(ops)))
    nrows = -(-max(1, len(ops)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.axis("off")
    for ax, op in zip(axes.flat, ops):
        series: Dict[str, list] = {}
        for r in rows:
            if r["op"] == op:
                n = sequence_length(cases.get(f"{op}/{r['shape']}", {}))
                if n:
                    series.setdefault(r["impl"], []).append((n, r["dtk_speedup"]))
        for name, pts in series.items():
            pts.sort()
            xs = [p[0] for p in pts]   # several shapes of one length (tile variants): points, no line
            ax.plot(xs, [p[1] for p in pts], "o-" if len(set(xs)) == len(xs) else "o", ms=4, lw=1, label=f"vs {name}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("dtk speedup (anchor ms / dtk ms)")
        ax.set_title(op)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no timed dtk/anchor pairs", ha="center", va="center", transform=ax.transAxes)
    m = data.get("meta", {})
    fig.suptitle(f"dtk speedup vs sequence length — {m.get('card')} — torch {m.get('torch')} — {m.get('date')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--gpu", action="store_true", help="run the GPU set (bf16, model shapes: docs/benchmarks.md) on cuda")
    p.add_argument("--op", action="append", help="op family to run (repeatable); default all")
    p.add_argument("--shape", action="append", help="shape name or glob (repeatable); default all")
    p.add_argument("--json", help="write results to this JSON file (rewritten after every case)")
    p.add_argument("--plot", help="write a PNG plot (throughput and dtk speedup per shape)")
    p.add_argument("--compare", help="print per-row time ratios against an earlier JSON")
    p.add_argument("--budget-s", type=float, default=None,
                   help="once this many seconds have passed, skip the remaining anchors (dtk rows still run)")
    p.add_argument("--skip-anchor", action="append", default=[],
                   help="anchor name or glob to skip, or op/name for one op's (e.g. window/naive); repeatable")
    p.add_argument("--slow-reps", type=int, default=3, help="reps for anchors taking ~0.1 s or more per call")
    p.add_argument("--cpu-target-s", type=float, default=0.3, help="CPU timer: seconds of timed reps per row")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = registry.select(args.gpu, args.op, args.shape)
    if args.list:
        for c in cases:
            print(f"{c.key:<48} {c.dtype:<9} impls: {', '.join(i.name for i in c.impls)}")
        return 0
    if not cases:
        print(f"no case matches op={args.op} shape={args.shape} ({'gpu' if args.gpu else 'cpu'} set); "
              f"ops: {registry.ops()}", file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if args.gpu else "cpu"
    meta = environment(device, argv)
    floor = measure_floor(device, cpu_target_s=args.cpu_target_s)
    meta["floor"] = floor
    copy_floor = measure_copy_bandwidth(device, cpu_target_s=args.cpu_target_s)
    meta["copy_floor"] = copy_floor
    print(f"# {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | cuda {meta['cuda']} | {meta['date']}")
    print(f"# FLOP floor: {floor['name']} {floor['ms']:.3f} ms = {floor['tflops']:.3g} TFLOP/s")
    print(f"# bandwidth floor: {copy_floor['name']} {copy_floor['ms']:.3f} ms = {copy_floor['gbs']:.4g} GB/s "
          "(read + write)")
    meta["cases"] = {c.key: dict(c.params, dtype=c.dtype, note=c.note) for c in cases}
    data = dict(schema=SCHEMA, meta=meta, rows=[])
    bar = progress(sum(len(c.impls) for c in cases), enabled=not args.no_progress)
    runner = Runner(device, floor, budget_s=args.budget_s, skip_anchors=args.skip_anchor,
                    slow_reps=args.slow_reps, cpu_target_s=args.cpu_target_s, bar=bar, copy_floor=copy_floor, log=lambda s: (sys.stderr.write(s + "\n"), sys.stderr.flush()))
    t0 = time.perf_counter()
    for case in cases:
        dtype = getattr(torch, case.dtype)
        data["rows"].extend(runner.run_case(case, dtype))
        data["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if args.json:
            write_json(args.json, data)
    bar.close()
    data["meta"]["budget_hit"] = runner.budget_hit
    print(format_table(data["rows"]))
    if runner.budget_hit:
        print(f"# note: --budget-s {args.budget_s:g} was exceeded; anchors after that point were skipped")
    print(f"# {len(data['rows'])} rows in {data['meta']['elapsed_s']:.1f} s")
    failed = [r for r in data["rows"] if r.get("status") == "FAILED"]
    for r in failed:
        print(f"# FAILED {r['shape']} {r['impl']}: {r.get('reason')}")
    if args.json:
        write_json(args.json, data)
        print(f"# wrote {args.json}")
    if args.plot:
        try:
            plot(data, args.plot)
            print(f"# wrote {args.plot}")
        except Exception as e:
            print(f"# plot failed: {e!r}")
    if args.compare:
        print(compare(data, load_json(args.compare)))
    return 1 if failed else 0
