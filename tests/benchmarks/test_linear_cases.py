"""The linear-attention benchmark cases and the bandwidth floor (CPU only, each test a few seconds)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, registry, results_md  # noqa: E402
from benchmarks.cases import linear as L  # noqa: E402
from benchmarks.timing import gbs, measure_copy_bandwidth, pct_of_bandwidth  # noqa: E402
from dtk.ops.linear import reference as R  # noqa: E402
from dtk.ops.memo import reference as MR  # noqa: E402

SMALL = [L.LinearShape("t-lin", 2, 300, 3, 24), L.LinearShape("t-memo", 40, 16, 2, 40, kind="memo")]


def _runner(**kw):
    return cli.Runner("cpu", {"tflops": 0.1, "name": "test"}, cpu_target_s=0.01,
                      copy_floor={"gbs": 10.0, "name": "copy"}, **kw)


def test_gpu_set_has_the_requested_shapes():
    cases = {c.shape: c for c in registry.select(True, ["linear"])}
    flux = cases["flux4k-S66048-H24-d128"]
    assert (flux.params["S"], flux.params["H"], flux.params["D"]) == (66048, 24, 128) and flux.dtype == "bfloat16"
    sd = {(c.params["S"], c.params["D"]) for n, c in cases.items() if n.startswith("sd15")}
    assert {(64 * 64, 40), (512 * 512, 40)} <= sd and {d for _, d in sd} == {40, 80, 160}
    assert all(c.params["H"] == 8 for n, c in cases.items() if n.startswith("sd15"))
    memo = cases["memo-32768x16-d40"]
    assert memo.params["B"] * memo.params["H"] == 32768 and memo.params["S"] == 16 and memo.params["D"] == 40
    assert [i.name for i in flux.impls] == ["dtk", "naive", "fla-causal", "sdpa", "sdpa-cudnn"]
    assert [i.name for i in memo.impls] == ["dtk", "naive"]
    cpu = registry.select(False, ["linear"])
    assert cpu and all(c.dtype == "float32" for c in cpu)


def test_work_counts():
    s = L.LinearShape("x", 2, 10, 3, 8)
    f, b = L.work_counts(s, 2)
    assert f == 2 * (2.0 * 2 * 3 * 10 * 8 * 8) + 2 * (2.0 * 2 * 3 * 10 * 8)
    assert b == 2 * 2 * 10 * 3 * (8 * 4)                     # q, k, v read, out written
    m = L.LinearShape("m", 5, 16, 2, 4, kind="memo")
    f, b = L.work_counts(m, 4)
    assert b == 4 * 5 * 16 * 2 * 16 + 4 * 2 * 5 * 2 * (16 + 4)  # + fp32 memory read and written


def test_naive_formulas_match_the_reference():
    q, k, v = (torch.randn(2, 37, 3, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(L.linfusion_naive(q, k, v), R.linear_attention_reference(q, k, v, eps=L.EPS))
    mkv, mz = MR.memory_update_reference(torch.randn(2, 16, 3, 16, dtype=torch.float64),
                                        torch.randn(2, 16, 3, 16, dtype=torch.float64))
    out, kv, z = L.memo_naive(q[:, :16], k[:, :16], v[:, :16], mkv, mz)
    torch.testing.assert_close(out, MR.memory_linear_attention_reference(q[:, :16], k[:, :16], v[:, :16], mkv, mz))
    rkv, rz = MR.memory_update_reference(k[:, :16], v[:, :16], mkv, mz)
    torch.testing.assert_close(kv, rkv)
    torch.testing.assert_close(z, rz)


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_runner_checks_and_times_dtk(shape):
    rows = _runner().run_case(L.make_case(shape, gpu=False), torch.float32)
    by = {r["impl"]: r for r in rows}
    for name in ("dtk", "naive"):
        assert by[name]["status"] == "ok" and by[name]["check"]["ok"], by[name]
        assert by[name]["pct_bw"] == pytest.approx(100 * by[name]["gbs"] / 10.0)
    assert by["naive"]["dtk_speedup"] > 0
    if shape.kind != "memo":
        assert by["sdpa"]["status"] == "ok" and "check" not in by["sdpa"]   # a different function: timed only
        assert by["sdpa"]["info"]["dense_tflops"] >= 0


def test_check_subset_rows_on_long_sequences():
    s = L.LinearShape("long", 2, 5000, 1, 8)
    rows = L.check_rows_for(s, "cpu")
    assert L.CHECK_ROWS <= rows.numel() <= L.CHECK_ROWS + 2 and {0, 4999} <= set(rows.tolist())
    d = _runner().run_case(L.make_case(s, gpu=False), torch.float32)[0]
    assert d["status"] == "ok" and 2 * L.CHECK_ROWS <= d["check"]["rows"] <= 2 * (L.CHECK_ROWS + 2)


def test_wrong_or_nan_result_is_failed(monkeypatch):
    import dtk
    monkeypatch.setattr(dtk, "linear_attention", lambda q, k, v, **kw: L.linfusion_naive(q, k, v) * 1.01)
    d = _runner().run_case(L.make_case(SMALL[0], gpu=False), torch.float32)[0]
    assert d["status"] == "FAILED" and "ms" not in d
    real = dtk.memory_linear_attention

    def nan_state(*a, **kw):
        out, (kv, z) = real(*a, **kw)
        return out, (kv, torch.full_like(z, float("nan")))
    monkeypatch.setattr(dtk, "memory_linear_attention", nan_state)
    d = _runner().run_case(L.make_case(SMALL[1], gpu=False), torch.float32)[0]
    assert d["status"] == "FAILED" and "NaN" in d["reason"]


def test_missing_op_is_skipped(monkeypatch):
    import dtk
    monkeypatch.delattr(dtk, "linear_attention")
    d = _runner().run_case(L.make_case(SMALL[0], gpu=False), torch.float32)[0]
    assert d["status"] == "skipped" and "not available" in d["reason"]


def test_copy_floor_and_percent():
    f = measure_copy_bandwidth("cpu", nbytes=1 << 20, cpu_target_s=0.01)
    assert f["gbs"] > 0 and f["bytes"] == 2 * (1 << 20)
    assert gbs(2e9, 1000.0) == pytest.approx(2.0)
    assert pct_of_bandwidth(1e9, 1.0, 2000.0) == pytest.approx(50.0)   # 1 GB in 1 ms = 1000 GB/s of 2000


def test_cli_and_results_md_show_bandwidth(tmp_path, capsys):
    j = tmp_path / "b.json"
    rc = cli.main(["--op", "linear", "--shape", "memo-*", "--json", str(j), "--no-progress", "--cpu-target-s", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0 and "bandwidth floor" in out and "% copy" in out
    data = cli.load_json(str(j))
    assert data["meta"]["copy_floor"]["gbs"] > 0
    assert all(r.get("pct_bw") is not None for r in data["rows"] if r["status"] == "ok")
    text = results_md.render(data)
    assert "bandwidth floor (same run)" in text and "| GB/s | % copy |" in text
