"""Unit tests of the benchmark suite's own logic (no GPU, each test well under a few seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, registry, results_md  # noqa: E402
from benchmarks.cases import window as W  # noqa: E402
from benchmarks.timing import pct_of_floor, tflops  # noqa: E402
from dtk.ops.window.reference import window_attention_reference, window_mask  # noqa: E402

EXTRA_SHAPES = [  # geometry corners beyond the default set: inward circle, clip box, 1D, grid < window
    W.WindowShape("t-circle-inward", 1, 2, 40, (9, 13), radius=5, border="inward", num_prefix=3),
    W.WindowShape("t-box-clip-tiled", 2, 1, 64, (7, 11), window=(4, 5), border="clip", tile=(2, 4)),
    W.WindowShape("t-1d", 1, 3, 64, (37,), window=(9,), num_prefix=2),
    W.WindowShape("t-3d-small-grid", 1, 1, 64, (2, 3, 5), window=(5, 7, -1), tile=(1, 2, 2)),
]


def _reference_op(q, k, v, grid, window=None, **kw):
    """The float64-capable reference standing in for dtk.window_attention in these tests only."""
    return window_attention_reference(q, k, v, grid, window, **kw)[0]


@pytest.fixture
def fake_dtk(monkeypatch):
    monkeypatch.setattr(W, "_dtk_op", lambda: _reference_op)


def _cpu_case(name):
    (c,) = [c for c in registry.select(False, ["window"]) if c.shape == name]
    return c


# ---------------------------------------------------------------------------------------------
# work counts and masks

@pytest.mark.parametrize("shape", W.CPU_SHAPES + EXTRA_SHAPES, ids=lambda s: s.name)
def test_flops_match_dense_mask_count(shape):
    case = W.make_case(shape, gpu=False)
    dense_pairs = int(window_mask(shape.spec()).sum())
    assert case.flops == 4.0 * shape.B * shape.H * shape.D * dense_pairs
    S = shape.spec().seq_len
    assert case.bytes == 4.0 * shape.B * S * shape.H * shape.D * 4


@pytest.mark.parametrize("shape", W.CPU_SHAPES + EXTRA_SHAPES, ids=lambda s: s.name)
def test_mask_rows_and_flex_mask_mod_equal_window_mask(shape):
    spec = shape.spec()
    S = spec.seq_len
    full = window_mask(spec)
    rows = torch.randperm(S)[: max(1, S // 3)]
    assert torch.equal(W.mask_rows(spec, rows), full[rows])
    mm = W.flex_mask_mod(spec, "cpu")
    assert torch.equal(mm(0, 0, torch.arange(S)[:, None], torch.arange(S)[None, :]), full)


def test_check_rows_subset_for_long_sequences():
    spec = W.GPU_SHAPES[0].spec()           # 4608 tokens > CHECK_ALL_ROWS_UP_TO
    rows = W.check_rows_for(spec, "cpu")
    P, S = spec.num_prefix, spec.seq_len
    assert W.CHECK_ROWS <= rows.numel() <= W.CHECK_ROWS + 4
    assert {0, P - 1, P, S - 1} <= set(rows.tolist())
    small = W.CPU_SHAPES[0].spec()
    assert W.check_rows_for(small, "cpu").numel() == small.seq_len


def test_gpu_set_is_registered_with_the_design_shapes():
    names = {c.shape for c in registry.select(True, ["window"])}
    assert {"na2d-256-w64-tile8x16", "na2d-256-w64-rowmajor", "freeswim-1080p-tile21x3x2",
            "freeswim-1080p-rowmajor", "clear8k-r16-clip-p512-tile8x16", "flux1024-r16-clip-p512-tile8x16",
            "flux2048-r16-clip-p512-tile8x16", "flux4096-r16-clip-p512-tile8x16", "wan480p-tile21x3x2",
            "wan14b-720p-tile21x3x2"} <= names
    c = next(c for c in registry.select(True, ["window"]) if c.shape == "na2d-256-w64-tile8x16")
    assert c.dtype == "bfloat16" and c.params["seq_len"] == 65536
    assert [i.name for i in c.impls][:5] == ["dtk", "dtk-ws", "dtk+permute", "sdpa-cudnn", "flex"]   # dtk-tma: gone


# ---------------------------------------------------------------------------------------------
# floor / percent maths

def test_floor_and_percent_maths():
    assert tflops(2e12, 10.0) == pytest.approx(200.0)
    # 1e12 FLOPs at a 200 TFLOP/s floor take 5 ms; measured 10 ms -> 50 % of the floor
    assert pct_of_floor(1e12, 10.0, 200.0) == pytest.approx(50.0)
    assert pct_of_floor(1e12, 5.0, 200.0) == pytest.approx(100.0)
    rows = [dict(kind="dtk", impl="dtk", status="ok", ms=2.0), dict(kind="anchor", impl="a", status="ok", ms=8.0),
            dict(kind="anchor", impl="b", status="skipped")]
    cli.add_speedups(rows)
    assert rows[1]["dtk_speedup"] == pytest.approx(4.0)
    assert rows[0]["speedup"] == {"a": pytest.approx(4.0)}
    assert "dtk_speedup" not in rows[2]


# ---------------------------------------------------------------------------------------------
# runner: correctness gate, budget, skip, JSON

def _runner(**kw):
    return cli.Runner("cpu", {"tflops": 0.1, "name": "test"}, cpu_target_s=0.01, **kw)


def test_runner_times_checked_rows(fake_dtk):
    rows = _runner().run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)
    by = {r["impl"]: r for r in rows}
    d = by["dtk"]
    assert d["status"] == "ok" and d["ms"] > 0 and d["check"]["ok"] and d["check"]["rows"] == 256
    assert by["naive"]["status"] == "ok" and by["naive"]["check"]["ok"]
    assert by["sdpa-math"]["status"] == "ok" and "dtk_speedup" in by["sdpa-math"]
    assert set(d["speedup"]) == {r["impl"] for r in rows if r["kind"] == "anchor" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            assert r["pct_floor"] == pytest.approx(pct_of_floor(r["flops"], r["ms"], 0.1))


def test_wrong_result_is_failed_not_timed(monkeypatch):
    monkeypatch.setattr(W, "_dtk_op", lambda: lambda q, k, v, grid, window=None, **kw: _reference_op(q, k, v, grid, window, **kw) * 1.01)
    rows = _runner().run_case(_cpu_case("circle-r4-20x20-p16-clip"), torch.float32)
    d = rows[0]
    assert d["impl"] == "dtk" and d["status"] == "FAILED" and "ms" not in d and "wrong result" in d["reason"]
    assert not any("dtk_speedup" in r for r in rows)


def test_nan_output_is_failed(monkeypatch):
    monkeypatch.setattr(W, "_dtk_op", lambda: lambda q, *a, **kw: torch.full_like(q, float("nan")))
    d = _runner().run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)[0]
    assert d["status"] == "FAILED" and "NaN" in d["reason"]


def test_missing_op_is_skipped_not_faked(monkeypatch):
    import dtk
    monkeypatch.delattr(dtk, "window_attention", raising=False)
    d = _runner().run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)[0]
    assert d["status"] == "skipped" and "not available" in d["reason"]


def test_budget_and_skip_anchor(fake_dtk):
    logs = []
    r = _runner(budget_s=0.0, log=logs.append)
    rows = r.run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)
    assert rows[0]["status"] == "ok"                      # dtk rows always run
    assert all(x["status"] == "skipped" and x["reason"].startswith("budget") for x in rows[1:])
    assert r.budget_hit and len(logs) == 1
    rows = _runner(skip_anchors=["sdpa-*"]).run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)
    assert {x["impl"] for x in rows if x.get("reason") == "--skip-anchor"} == {f"sdpa-{b}" for b in W.SDPA_BACKENDS}
    rows = _runner(skip_anchors=["window/naive", "linear/sdpa-*"]).run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"),
                                                                          torch.float32)
    assert {x["impl"] for x in rows if x.get("reason") == "--skip-anchor"} == {"naive"}   # op-qualified


def _fake_data(card="H200", ms_scale=1.0):
    rows = [dict(op="window", shape="s1", impl="dtk", kind="dtk", status="ok", ms=1.0 * ms_scale, tflops=10.0,
                 pct_floor=1.2, flops=1e10, bytes=1e6, speedup={"sdpa-cudnn": 4.0},
                 check=dict(ok=True, err=1e-3, tol=2e-2, rows=256, against="ref")),
            dict(op="window", shape="s1", impl="sdpa-cudnn", kind="anchor", status="ok", ms=4.0, tflops=2.5,
                 pct_floor=0.3, flops=1e10, bytes=1e6, dtk_speedup=4.0, info={"dense_tflops": 600.0}),
            dict(op="window", shape="s1", impl="flex", kind="anchor", status="skipped", reason="budget: x | y")]
    meta = dict(card=card, date="2026-11-26 00:00:00 UTC", torch="2.11.0", triton="3.6.0", cuda="13.0",
                cudnn=91000, python="3.12.3", command="python -m benchmarks --gpu", floor=dict(name="gemm", tflops=790.0),
                elapsed_s=12.0, budget_hit=True)
    return dict(schema=cli.SCHEMA, meta=meta, rows=rows)


def test_json_schema_round_trip(tmp_path):
    data = _fake_data()
    data["rows"][0]["nan_field"] = float("nan")
    p = tmp_path / "r.json"
    cli.write_json(str(p), data)
    back = cli.load_json(str(p))
    assert back["rows"][0]["nan_field"] is None                 # strict JSON: no NaN literals
    json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    del data["rows"][0]["nan_field"], back["rows"][0]["nan_field"]
    assert back == data
    p.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        cli.load_json(str(p))


def test_compare_output():
    text = cli.compare(_fake_data(ms_scale=0.5), _fake_data(card="H100"))
    assert "different devices" in text
    line = next(l for l in text.splitlines() if l.startswith("s1") and " dtk " in l)
    assert line.split()[2:5] == ["1.000", "0.500", "0.500"] and "faster" in line
    assert not any(" flex " in l for l in text.splitlines())    # untimed rows are not compared
    assert "no row timed" in cli.compare(_fake_data(), dict(_fake_data(), rows=[]))


def test_host_time_counts_enqueue_time_only(monkeypatch):
    """host_time: the CPU time per call of a few calls between two device syncs (the syncs are
    not counted), the launch-overhead figure of each GPU row's notes."""
    import time as _time
    from benchmarks import timing
    syncs, calls = [], []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: (syncs.append(1), _time.sleep(0.05)))
    ms = timing.host_time(lambda: (calls.append(1), _time.sleep(0.002)), reps=4)
    assert len(calls) == 4 and len(syncs) == 2
    assert 2.0 <= ms < 40.0
    assert "host_ms=0.25" in results_md.row_notes(dict(status="ok", info=dict(host_ms=0.25)))


def test_results_md_generation(tmp_path):
    data = _fake_data()
    text = results_md.render(data)
    for s in ("H200", "2026-11-26", "torch 2.11.0", "Triton 3.6.0", "CUDA 13.0", "`python -m benchmarks --gpu`",
              "| s1 | dtk | 1.000 |", "| s1 | sdpa-cudnn | 4.000 |", "4.00 |", "budget-s exceeded", "budget: x \\| y"):
        assert s in text, s
    p = tmp_path / "b.json"
    cli.write_json(str(p), data)
    out = tmp_path / "RESULTS.md"
    assert results_md.main([str(p), "-o", str(out)]) == 0
    assert out.read_text() == results_md.render_runs([data], sources=[str(p)]) and "Generated from" in out.read_text()
    assert out.read_text().startswith(text)
    assert "no GPU result yet" in results_md.render_placeholder()
    # two runs (e.g. op families, then the end-to-end models): one page, each run with its header
    other = dict(data, meta=dict(data["meta"], command="python -m benchmarks --gpu --op e2e"))
    q = tmp_path / "e2e.json"
    cli.write_json(str(q), other)
    assert results_md.main([str(p), str(q), "-o", str(out)]) == 0
    two = out.read_text()
    assert two.count("# Run ") == 2 and two.count("- card: **") == 2 and "--op e2e" in two
    assert two.count("| s1 | dtk | 1.000 |") == 2
    # a launch-config sweep's text output, verbatim after the runs and named with the sources
    log = tmp_path / "sweeps.log"
    log.write_text("NVIDIA H200  torch 2.11.0\nna2d  default  13.6 ms\n")
    assert results_md.main([str(p), "--log", str(log), "-o", str(out)]) == 0
    page = out.read_text()
    assert "# Launch-config sweep:" in page and "na2d  default  13.6 ms" in page
    assert page.index("| s1 | dtk |") < page.index("na2d  default") and "sweeps.log`." in page


# ---------------------------------------------------------------------------------------------
# the CLI itself

def test_cli_cpu_run_in_process(fake_dtk, tmp_path, capsys):
    j, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli.main(["--shape", "3d-*", "--json", str(j), "--plot", str(png), "--no-progress", "--skip-anchor", "sdpa-math",
                   "--cpu-target-s", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "FLOP floor" in out and "3d-4x8x8-w(-1,3,5)" in out and "--skip-anchor" in out
    data = cli.load_json(str(j))
    assert data["meta"]["command"].startswith("python -m benchmarks --shape") and data["meta"]["floor"]["tflops"] > 0
    assert data["meta"]["cases"]["window/3d-4x8x8-w(-1,3,5)"]["grid"] == [4, 8, 8]
    assert "| 3d-4x8x8-w(-1,3,5) | B=1, H=2, D=64, grid=[4, 8, 8]" in results_md.render(data)
    assert {r["impl"] for r in data["rows"]} == {"dtk", "naive", "natten"} | {f"sdpa-{b}" for b in W.SDPA_BACKENDS}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    rc = cli.main(["--shape", "3d-*", "--no-progress", "--compare", str(j), "--skip-anchor", "*",
                   "--cpu-target-s", "0.01"])
    assert "new/old" in capsys.readouterr().out


def test_cli_subprocess_list_and_bad_shape():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "window/2d-24x24-w7-p8" in r.stdout
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--shape", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no case matches" in r.stderr


def test_op_without_a_kernel_for_the_device_is_skipped(monkeypatch):
    def no_kernel(*a, **kw):
        raise NotImplementedError("Could not run 'dtk::window_attention' with arguments from the 'CPU' backend.")
    monkeypatch.setattr(W, "_dtk_op", lambda: no_kernel)
    d = _runner().run_case(_cpu_case("3d-4x8x8-w(-1,3,5)"), torch.float32)[0]
    assert d["status"] == "skipped" and "no cpu kernel" in d["reason"]


def test_permute_row_counts_the_tile_permutation(monkeypatch):
    """Tile-order cases also time dtk from row-major tokens (to_tile_order + op + back); its check
    puts the output back in tile order, so an op that ignored the order would fail it."""
    c = _cpu_case("2d-24x24-w7-p8-tile4x8")
    assert [i.name for i in c.impls].count("dtk+permute") == 1
    assert "dtk+permute" not in [i.name for i in _cpu_case("3d-4x8x8-w(-1,3,5)").impls]
    by = {r["impl"]: r for r in _runner().run_case(c, torch.float32)}
    assert by["dtk+permute"]["status"] == "ok" and by["dtk+permute"]["check"]["ok"], by["dtk+permute"]
    # the same op fed tile-ordered inputs as if row-major: wrong, and the check says so
    import dtk
    monkeypatch.setattr(dtk, "to_tile_order", lambda x, *a, **kw: x)
    by = {r["impl"]: r for r in _runner().run_case(c, torch.float32)}
    assert by["dtk+permute"]["status"] == "FAILED", by["dtk+permute"]


def test_sequence_length_of_each_family():
    from benchmarks.cli import sequence_length
    assert sequence_length(dict(grid=[64, 64], num_prefix=512, seq_len=4608)) == 4608     # window
    assert sequence_length(dict(B=1, S=66048, H=24)) == 66048                              # linear
    assert sequence_length(dict(lens=[512, 4096, 4096])) == 8704                           # sparse
    assert sequence_length(dict(model="flux", grid=[128, 128], text=512)) == 16896         # e2e
    assert sequence_length(dict(B=1)) is None


def test_target_bounds_from_exact_work():
    from benchmarks import bounds as B
    t = B.Target("tiny", 2, 64, (16, 16), (5, 5), None, "inward", 0, (4, 8), ms=1.0)
    rows = B.bounds(t, floor_tflops=100.0, target_ms=1.0)
    assert {r["tile"] for r in rows} >= {None, (4, 8)}
    for r in rows:
        assert 0 < r["plan_eff"] <= 1
        assert r["need_tflop"] == pytest.approx(4 * 2 * 64 * 16 * 16 * 25 / 1e12)
        assert r["ms_at_floor"] == pytest.approx(r["computed_tflop"] * 1e12 / (100.0 * 1e9))
        assert r["required_pct_of_floor"] == pytest.approx(100 * r["ms_at_floor"] / 1.0)
    data = dict(rows=[dict(op="window", impl="sdpa-cudnn", shape="freeswim-1080p-x", ms=300.0),
                      dict(op="window", impl="flex", shape="clear8k-x", ms=5.0)])
    assert B._dense_ms(data, "freeswim-1080p") == 300.0 and B._dense_ms(data, "clear8k") is None


def test_host_profile_of_a_cpu_case(capsys):
    """benchmarks.host_profile: the dtk row's host ms per call and the profile naming its call
    path (here down to the op's entry point)."""
    from benchmarks import host_profile
    assert host_profile.main(["--cpu", "--op", "linear", "--shape", "linfusion-S1024-H4-d64", "--calls", "3"]) == 0
    out = capsys.readouterr().out
    assert "linfusion-S1024-H4-d64 dtk:" in out and "ms host per call" in out and "linear_attention" in out
    with pytest.raises(SystemExit):
        host_profile.main(["--cpu", "--shape", "no-such-shape"])
