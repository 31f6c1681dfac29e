"""The rms_norm_rope kernel compiles for Ampere and Hopper with every launch its launcher may make
(the autotuner's whole list; head dims 40..256, bf16 and fp32, with and without the rotation)
without spilling. No GPU needed (tests/triton_aot.py)."""
import pytest
import torch

from ...triton_aot import compile_all, job

tr = pytest.importorskip("dtk.ops.rotary.triton")


@pytest.mark.parametrize("arch", [90, 80])
def test_rms_norm_rope_compiles(arch):
    cases, jobs = [], []
    for dtype, x in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        for D in (40, 64, 128, 160, 256):
            for rope in (True, False):
                for cfg in tr.launch_configs(D):
                    cases.append((dtype, D, rope, cfg))
                    jobs.append(job("dtk.ops.rotary.triton:_rms_norm_rope_fwd", arch,
                                    dict(X=x, W=x, COS="*fp32", SIN="*fp32", OUT=x, eps="fp32"),
                                    dict(HAS_WEIGHT=True, ROPE=rope, INTERLEAVED=True, ACROSS_HEADS=False, ROWS=cfg["ROWS"],
                                         BLOCK_D=cfg["BLOCK_D"]), num_warps=cfg["num_warps"]))
        for H in (12, 40):   # the across-heads norm (Wan 1.3B and 14B), one launch per (H, D)
            cfg = tr.across_heads_config(H, 128)
            cases.append((dtype, 128, f"across {H} heads", cfg))
            jobs.append(job("dtk.ops.rotary.triton:_rms_norm_rope_fwd", arch,
                            dict(X=x, W=x, COS="*fp32", SIN="*fp32", OUT=x, eps="fp32"),
                            dict(HAS_WEIGHT=True, ROPE=True, INTERLEAVED=True, ACROSS_HEADS=True, ROWS=cfg["ROWS"],
                                 BLOCK_D=cfg["BLOCK_D"]), num_warps=cfg["num_warps"]))
    results = compile_all(jobs)
    report = [f"sm_{arch} {dtype} D={D} rope={rope} {cfg}: registers {r['registers']} spills {r['spill_bytes']}"
              for (dtype, D, rope, cfg), r in zip(cases, results)]
    print("\n".join(report))
    if arch == 90:
        spills = [line for line, r in zip(report, results) if r["spill_bytes"]]
        assert not spills, "spilling:\n" + "\n".join(spills)
