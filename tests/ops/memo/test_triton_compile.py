"""Every MEMO kernel compiles for Ampere and Hopper with its launch configuration (and the
several-clip variants linear_sweep launches) and fits the shared memory of the card: the
interpreter skips the compiler, and a config over the limit fails to launch only on the GPU
(``OutOfResources: shared memory``). No GPU needed; compiled with the runtime's alignment
specialisation (tests/triton_aot.py)."""
import pytest
import torch

from dtk.ops._linear_core import dtype_flags
from dtk.ops.memo import engine
from ...triton_aot import compile_and_check_fit, job

pytest.importorskip("triton")

HEAD_DIMS = [40, 64, 80, 128, 160]
FP32_HEAD_DIMS = [128, 160]  # fp32 inputs (rarely used on a GPU): the largest tiles
MEMO_FRAMES = 16  # MEMO: B=8192 x 16 frames x 8 heads x D=40 (the timing script's shape)

FLT = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _types(kernel: str, dtype) -> dict:
    x, f = FLT[dtype], "*fp32"
    scalars = {"decay": "fp32", "qscale": "fp32", "log2_decay": "fp32", "decay_n": "fp32"}
    ptrs = {
        "memory": dict(Q=x, K=x, V=x, MKV=f, MZ=f, O=x),
        "memory_update": dict(K=x, V=x, MKV=f, MZ=f, NKV=f, NZ=f),
        "memory_step": dict(Q=x, K=x, V=x, MKV=f, MZ=f, O=x, NKV=f, NZ=f),
    }[kernel]
    return {**scalars, **ptrs}


def _cases(dtype):
    for kernel, fn in engine.KERNELS.items():
        for D in (HEAD_DIMS if dtype == torch.bfloat16 else FP32_HEAD_DIMS):
            cfg = engine.launch_config(kernel, D, D, MEMO_FRAMES)
            yield kernel, fn, D, cfg
            if kernel == "memory_step" and D <= 64:   # the variants linear_sweep launches (D = 40)
                for clips, warps, stages in engine.MEMO_STEP_VARIANTS:
                    yield kernel, fn, D, dict(cfg, CLIPS=clips, num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_memo_kernels_compile_and_fit(arch, dtype):
    cases = list(_cases(dtype))
    jobs = []
    for kernel, fn, D, cfg in cases:
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "CLIPS"}
        lowp, ieee = dtype_flags(dtype)
        jobs.append(job(f"dtk.ops.memo.triton:{fn}", arch, _types(kernel, dtype),
                        {**blocks, "HAS_MEM": True, "LOWP": lowp, "IEEE": ieee},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    report, results = compile_and_check_fit(arch, cases, jobs)
    if arch == 90 and dtype == torch.bfloat16:
        # MEMO's products on tensor cores: as fp32 FMAs they took 255 registers at D = 40 (two
        # programs per SM) and spilled kilobytes from D = 80
        # (the register cap is the default launch's: the sweep's several-clip variants trade registers
        # for prefetching)
        memo = [line for line, (k, _, D, cfg), r in zip(report, cases, results) if
                (r["wgmma"] == 0 or (D <= 128 and r["spill_bytes"]) or
                 (D <= 64 and cfg.get("CLIPS", 1) == 1 and r["registers"] > 128))]
        assert not memo, "MEMO kernels off tensor cores or spilling:\n" + "\n".join(memo)
    # ptxas keeps the wgmma pipeline asynchronous (C7515 would make every wgmma wait for the last).
    serial = [line for line, r in zip(report, results) if r["serialized"]]
    assert not serial, "wgmma pipeline serialised:\n" + "\n".join(serial)
