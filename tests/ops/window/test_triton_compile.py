"""The window kernel compiles for Ampere and Hopper (the interpreter skips the compiler's checks)."""
import itertools

from ...triton_aot import compile_all, job

PTRS = {n: "*bf16" for n in ("Q", "K", "V", "EK", "EV", "O")}
PTRS.update({"LSE": "*fp32", "QB": "*i32", "ENT": "*i32", "CNT": "*i32", "ORDER": "*i32", "qk_scale": "fp32",
             "INWARD": "i1"})


def test_window_kernel_compiles():
    configs = list(itertools.product([80, 90], [True, False], [64, 128, 256]))
    jobs = [job("dtk.ops.window.triton:_window_fwd", arch, PTRS,
                dict(IS_BOX=is_box, BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd, EVEN_D=bd != 256), num_warps=8, num_stages=2 if bd > 128 else 3)
            for arch, is_box, bd in configs]
    for (arch, is_box, bd), res in zip(configs, compile_all(jobs)):
        assert res["shared"] <= 227 * 1024, (arch, is_box, bd, res)
        if arch == 90 and bd == 128:
            assert res["wgmma"] > 0, "the Hopper build should use wgmma"
