"""Every linear-attention kernel compiles for Ampere and Hopper with every launch configuration its
launcher may choose (the autotuner's whole list) and fits the shared memory of the card: the
interpreter skips the compiler, and a config over the limit fails to launch only on the GPU
(``OutOfResources: shared memory``). No GPU needed; compiled with the runtime's alignment
specialisation (tests/triton_aot.py), so the loops are software-pipelined as on the GPU."""
import pytest
import torch

from dtk import _config
from dtk.ops._linear_core import dtype_flags
from dtk.ops.linear import launch as lc
from ...triton_aot import compile_and_check_fit, job

pytest.importorskip("triton")

HEAD_DIMS = [40, 64, 80, 128, 160]
FP32_HEAD_DIMS = [128, 160]  # fp32 inputs (rarely used on a GPU): the largest tiles

FLT = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _types(kernel: str, dtype) -> dict:
    x, f = FLT[dtype], "*fp32"
    scalars = {"scale": "fp32", "eps": "fp32", "CU": "*i32", "CNT": "*i64"}
    ptrs = {
        "state": dict(K=x, V=x, PKV=f, PKS=f),
        "apply": dict(Q=x, KV=f, KS=f, O=x),
        "grad_q": dict(Q=x, G=x, KV=f, KS=f, DQ=x, PGS=f, PGZ=f),
        "grad_kv": dict(K=x, V=x, GS=f, GZ=f, DK=x, DV_=x),
        "grad_rows": dict(Q=x, G=x, SL=x, KS=f, W=f),
        "grad_s_wide": dict(Q=x, G=x, W=f, PGS=f, PGZ=f),
        "grad_feature": dict(X=x, Y=x, T=x, C=f, W=f, O=x),
    }[kernel]
    return {**scalars, **ptrs}


def _flags(kernel: str, dtype, D: int, Dv: int, cfg: dict) -> dict:
    lowp, ieee = dtype_flags(dtype)
    flags = dict(FM=0, VARLEN=False, LOWP=lowp, IEEE=ieee, **lc.even_flags(D, Dv, cfg))
    if kernel == "state":
        flags["ATOMIC"] = True
        flags["KS_DOT"] = _config.get("linear_state_ks_by_dot")
    if kernel in ("apply", "grad_q", "grad_kv", "grad_s_wide"):
        flags["NORMALIZE"] = True
    if kernel in ("apply", "grad_q", "grad_rows", "grad_s_wide", "grad_feature"):
        flags["HAS_SCALE"] = False
    if kernel == "grad_feature":   # the dq launch (per-row weights); dk's is ADD_C
        flags.update(ROW_W=True, ADD_C=False)
    if kernel == "apply":
        flags["DEN_DOT"] = _config.get("linear_apply_den_by_dot")
        flags["HAS_CNT"] = False   # the fused forward's launch (the apply op's passes its counts)
    return flags


def _cases(arch: int, dtype):
    for kernel, fn in lc.KERNELS.items():
        for D in (HEAD_DIMS if dtype == torch.bfloat16 else FP32_HEAD_DIMS):
            if kernel.startswith("grad") and (kernel in ("grad_q", "grad_kv")) != lc.backward_whole_tiles(D, D):
                continue   # the other backward path's kernel: not launched at this head dim
            for cfg in lc.launch_configs(kernel, D, D, dtype, gpu=True):
                yield kernel, fn, D, cfg


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_kernels_compile_and_fit(arch, dtype):
    cases = list(_cases(arch, dtype))
    jobs = []
    for kernel, fn, D, cfg in cases:
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        jobs.append(job(f"dtk.ops.linear.{fn}", arch, _types(kernel, dtype),
                        {**blocks, **_flags(kernel, dtype, D, D, cfg)},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    report, results = compile_and_check_fit(arch, cases, jobs)
    # Every streaming kernel of the bf16 Hopper build runs its dots on wgmma.
    if arch == 90 and dtype == torch.bfloat16:
        no_wgmma = [line for line, (k, _, D, cfg), r in zip(report, cases, results) if r["wgmma"] == 0]
        assert not no_wgmma, "no wgmma:\n" + "\n".join(no_wgmma)
    # ptxas keeps the wgmma pipeline asynchronous (C7515 would make every wgmma wait for the last).
    serial = [line for line, r in zip(report, results) if r["serialized"]]
    assert not serial, "wgmma pipeline serialised:\n" + "\n".join(serial)
    # The streaming kernels are software-pipelined (cp.async) in the aligned build.
    no_pipe = [line for line, (k, _, D, cfg), r in zip(report, cases, results) if r["cp_async"] == 0]
    assert not no_pipe, "loads not pipelined:\n" + "\n".join(no_pipe)
    # Every head dim launches each kernel of its path (the backward: whole tiles or wide kernels).
    for kernel in lc.KERNELS:
        for D in (HEAD_DIMS if dtype == torch.bfloat16 else FP32_HEAD_DIMS):
            if kernel.startswith("grad") and (kernel in ("grad_q", "grad_kv")) != lc.backward_whole_tiles(D, D):
                continue
            assert any(k == kernel and d == D for k, _, d, _ in cases), (kernel, D)
