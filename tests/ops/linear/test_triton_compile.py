"""Every linear-attention kernel compiles for Ampere and Hopper with every launch configuration its
launcher may choose (the autotuner's whole list) and fits the shared memory of the card: the
interpreter skips the compiler, and a config over the limit fails to launch only on the GPU
(``OutOfResources: shared memory``). No GPU needed; compiled with the runtime's alignment
specialisation (tests/triton_aot.py), so the loops are software-pipelined as on the GPU."""
import pytest
import torch

from ...triton_aot import compile_all, job

tr = pytest.importorskip("dtk.ops.linear.triton")

# Shared memory a block may use: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
HEAD_DIMS = [40, 64, 80, 128, 160]
FP32_HEAD_DIMS = [128, 160]  # fp32 inputs (rarely used on a GPU): the largest tiles
MEMO_FRAMES = 16  # MEMO: B=8192 x 16 frames x 8 heads x D=40 (the timing script's shape)

FLT = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _types(kernel: str, dtype) -> dict:
    x, f = FLT[dtype], "*fp32"
    scalars = {"scale": "fp32", "eps": "fp32", "decay": "fp32", "qscale": "fp32", "log2_decay": "fp32",
               "decay_n": "fp32", "CU": "*i32", "CNT": "*i64"}
    ptrs = {
        "state": dict(K=x, V=x, PKV=f, PKS=f),
        "apply": dict(Q=x, KV=f, KS=f, O=x),
        "grad_q": dict(Q=x, G=x, KV=f, KS=f, DQ=x, PGS=f, PGZ=f),
        "grad_kv": dict(K=x, V=x, GS=f, GZ=f, DK=x, DV_=x),
        "grad_rows": dict(Q=x, G=x, SL=x, KS=f, W=f),
        "grad_s_wide": dict(Q=x, G=x, W=f, PGS=f, PGZ=f),
        "grad_feature": dict(X=x, Y=x, T=x, C=f, W=f, O=x),
        "memory": dict(Q=x, K=x, V=x, MKV=f, MZ=f, O=x),
        "memory_update": dict(K=x, V=x, MKV=f, MZ=f, NKV=f, NZ=f),
        "memory_step": dict(Q=x, K=x, V=x, MKV=f, MZ=f, O=x, NKV=f, NZ=f),
    }[kernel]
    return {**scalars, **ptrs}


def _flags(kernel: str, dtype, D: int, Dv: int, cfg: dict) -> dict:
    lowp, ieee = tr._flags(dtype)
    if kernel.startswith("memory"):
        return dict(HAS_MEM=True, LOWP=lowp, IEEE=ieee)
    flags = dict(FM=0, VARLEN=False, LOWP=lowp, IEEE=ieee, **tr.even_flags(D, Dv, cfg))
    if kernel == "state":
        flags["ATOMIC"] = True
        flags["KS_DOT"] = tr.STATE_KS_BY_DOT
    if kernel in ("apply", "grad_q", "grad_kv", "grad_s_wide"):
        flags["NORMALIZE"] = True
    if kernel in ("apply", "grad_q", "grad_rows", "grad_s_wide", "grad_feature"):
        flags["HAS_SCALE"] = False
    if kernel == "grad_feature":   # the dq launch (per-row weights); dk's is ADD_C
        flags.update(ROW_W=True, ADD_C=False)
    if kernel == "apply":
        flags["DEN_DOT"] = tr.APPLY_DEN_BY_DOT
        flags["HAS_CNT"] = False   # the fused forward's launch (the apply op's passes its counts)
    return flags


def _cases(arch: int, dtype):
    for kernel, fn in tr.KERNELS.items():
        for D in (HEAD_DIMS if dtype == torch.bfloat16 else FP32_HEAD_DIMS):
            for cfg in tr.launch_configs(kernel, D, D, dtype, gpu=True, frames=MEMO_FRAMES):
                yield kernel, fn, D, cfg
                if kernel == "memory_step" and D <= 64:   # the variants linear_sweep launches (D = 40)
                    for clips, warps, stages in tr.MEMO_STEP_VARIANTS:
                        yield kernel, fn, D, dict(cfg, CLIPS=clips, num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_kernels_compile_and_fit(arch, dtype):
    cases = list(_cases(arch, dtype))
    jobs = []
    for kernel, fn, D, cfg in cases:
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "CLIPS"}
        jobs.append(job(f"dtk.ops.linear.triton:{fn}", arch, _types(kernel, dtype),
                        {**blocks, **_flags(kernel, dtype, D, D, cfg)},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    results = compile_all(jobs)
    report = [f"sm_{arch} {k} D={D} {cfg}: shared {r['shared']} wgmma {r['wgmma']} cp.async {r['cp_async']}"
              f" serialised {r['serialized']} registers {r['registers']} spills {r['spill_bytes']}"
              for (k, _, D, cfg), r in zip(cases, results)]
    print("\n".join(report))
    over = [line for line, (k, _, D, cfg), r in zip(report, cases, results) if r["shared"] > SMEM_LIMIT[arch]]
    assert not over, "over the shared-memory limit:\n" + "\n".join(over)
    # Every streaming kernel of the bf16 Hopper build runs its dots on wgmma.
    if arch == 90 and dtype == torch.bfloat16:
        no_wgmma = [line for line, (k, _, D, cfg), r in zip(report, cases, results)
                    if not k.startswith("memory") and r["wgmma"] == 0]
        assert not no_wgmma, "no wgmma:\n" + "\n".join(no_wgmma)
        # MEMO's products on tensor cores too: as fp32 FMAs they took 255 registers at D = 40 (two
        # programs per SM) and spilled kilobytes from D = 80
        # (the register cap is the default launch's: the sweep's several-clip variants trade registers
        # for prefetching)
        memo = [line for line, (k, _, D, cfg), r in zip(report, cases, results) if k.startswith("memory") and
                (r["wgmma"] == 0 or (D <= 128 and r["spill_bytes"]) or
                 (D <= 64 and cfg.get("CLIPS", 1) == 1 and r["registers"] > 128))]
        assert not memo, "MEMO kernels off tensor cores or spilling:\n" + "\n".join(memo)
    # ptxas keeps the wgmma pipeline asynchronous (C7515 would make every wgmma wait for the last).
    serial = [line for line, r in zip(report, results) if r["serialized"]]
    assert not serial, "wgmma pipeline serialised:\n" + "\n".join(serial)
    # The streaming kernels are software-pipelined (cp.async) in the aligned build.
    no_pipe = [line for line, (k, _, D, cfg), r in zip(report, cases, results)
               if not k.startswith("memory") and r["cp_async"] == 0]
    assert not no_pipe, "loads not pipelined:\n" + "\n".join(no_pipe)
    # Every head dim launches each kernel of its path (the backward: whole tiles or wide kernels).
    for kernel in tr.KERNELS:
        for D in (HEAD_DIMS if dtype == torch.bfloat16 else FP32_HEAD_DIMS):
            if kernel.startswith("grad") and (kernel in ("grad_q", "grad_kv")) != tr.backward_whole_tiles(D, D):
                continue
            assert any(k == kernel and d == D for k, _, d, _ in cases), (kernel, D)
