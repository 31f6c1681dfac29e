"""The sparse-token and cache kernels compile for Ampere and Hopper (the interpreter skips the
compiler's checks)."""
from dtk.ops.window.triton import launch_configs

from ...triton_aot import compile_all, job

SHARED_LIMIT = {80: 166912, 90: 232448}

BF16 = "*bf16"


def _mkv_types():
    t = {"Q": BF16, "QI": "*i32", "O": BF16, "LSE": "*fp32", "qk_scale": "fp32"}
    for i in range(4):
        t.update({f"K{i}": BF16, f"V{i}": BF16, f"I{i}": "*i32"})
    return t


def test_sparse_kernels_compile():
    jobs, names = [], []
    for arch in (80, 90):
        for nseg, hi, has_qi, scatter, bd in [(1, False, False, False, 128), (3, True, True, True, 128),
                                              (4, False, True, False, 64), (2, False, False, False, 256)]:
            const = dict(NSEG=nseg, HI0=hi, HI1=False, HI2=hi, HI3=False, HAS_QI=has_qi, SCATTER=scatter,
                         BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd)
            w, st = launch_configs(bd)[0]
            jobs.append(job("dtk.ops.sparse.triton:_mkv_fwd", arch, _mkv_types(), const, num_warps=w, num_stages=st))
            names.append(("mkv", arch, nseg, bd))
        for has_bias in (False, True):
            jobs.append(job("dtk.ops.sparse.triton:_seg_fwd", arch,
                            {"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "LSE": "*fp32", "CU": "*i32", "GM": "*i8",
                             "GB": "*fp32", "qk_scale": "fp32"},
                            dict(HAS_BIAS=has_bias, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128), num_warps=8, num_stages=2))
            names.append(("seg", arch, has_bias))
        jobs.append(job("dtk.ops.cache.triton:_blend", arch, {"BASE": BF16, "CACHE": BF16, "OUT": BF16,
                                                                "LAM": "*fp32", "lam": "fp32"},
                        dict(HAS_LAM=True, BLOCK=1024), num_warps=4))
        jobs.append(job("dtk.ops.cache.triton:_scatter", arch, {"FRESH": BF16, "IDX": "*i32", "CACHE": BF16,
                                                                  "OUT": BF16}, dict(BLOCK=1024), num_warps=4))
        names += [("blend", arch), ("scatter", arch)]
        for nseg, has_qi, scatter in ((1, False, False), (2, True, False), (4, True, True)):
            ptrs = {f"{c}{i}": t for i in range(4) for c, t in (("O", BF16), ("L", "*fp32"))}
            jobs.append(job("dtk.ops.sparse.merge:_merge", arch, {**ptrs, "QI": "*i64", "OUT": BF16, "LSE": "*fp32"},
                            dict(NSEG=nseg, HAS_QI=has_qi, SCATTER=scatter, BLOCK_R=32, BLOCK_D=128), num_warps=4))
            names.append(("merge", arch, nseg))
    for name, res in zip(names, compile_all(jobs)):
        assert res["shared"] <= SHARED_LIMIT[name[1]], (name, res)
        if name[0] in ("mkv", "seg") and name[1] == 90 and name[-1] in (128, True, False):
            assert res["wgmma"] > 0, (name, "the Hopper build should use wgmma")
        if name[1] == 90:   # ptxas would make every wgmma wait for the previous one (C7515)
            assert not res["serialized"], (name, "wgmma pipeline serialised", res)
