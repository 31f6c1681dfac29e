"""benchmarks/glue_bytes.py: the traffic count runs on meta tensors and sees what the fused op saves."""
import pytest

from benchmarks import glue_bytes


def test_counts_on_meta_tensors(capsys):
    pytest.importorskip("diffusers")
    r = glue_bytes.glue_bytes(S=300, H=24, D=64)
    x = 300 * 24 * 64 * 2
    assert r["x"] == x and r["dtk"] == 2 * x + 2 * 300 * 64 * 4
    # diffusers' rotation alone is a dozen passes over x, several in float32 (views move nothing)
    assert r["rope"] > 20 * x and all(b > 0 for _, b in r["rope_ops"])
    assert r["norm_fused"] + r["rope"] > 10 * r["dtk"]
    assert glue_bytes.main(["--seq", "300", "--heads", "3", "--head-dim", "64"]) == 0
    assert "dtk.rms_norm_rope" in capsys.readouterr().out


def test_wan_counts():
    pytest.importorskip("diffusers")
    r = glue_bytes.glue_bytes(S=300, H=12, D=64, model="wan")
    assert r["x"] == 300 * 12 * 64 * 2 and r["rope"] > 20 * r["x"]   # float64 products of both halves
    with pytest.raises(ValueError, match="model must be"):
        glue_bytes.glue_bytes(model="sd")
