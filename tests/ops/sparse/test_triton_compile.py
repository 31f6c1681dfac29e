"""The sparse-token and cache kernels compile for Ampere and Hopper (the interpreter skips the
compiler's checks)."""
from dtk.ops.window.triton import launch_configs

from ...triton_aot import compile_all, job

SHARED_LIMIT = {80: 166912, 90: 232448}

BF16 = "*bf16"


BWD_TYPES = {"DO": BF16, "LSE2": "*fp32", "DELTA": "*fp32", "dq_scale": "fp32", "dk_scale": "fp32", "K": BF16,
             "V": BF16, "DK": BF16, "DV": BF16, "KI": "*i32"}
SEG_TYPES = {"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "LSE": "*fp32", "CU": "*i32", "GM": "*i8", "GB": "*fp32",
             "qk_scale": "fp32", **BWD_TYPES}


def _mkv_types():
    t = {"Q": BF16, "QI": "*i32", "O": BF16, "LSE": "*fp32", "qk_scale": "fp32", **BWD_TYPES}
    for i in range(4):
        t.update({f"K{i}": BF16, f"V{i}": BF16, f"I{i}": "*i32"})
    return t


def test_sparse_kernels_compile():
    jobs, names = [], []
    for arch in (80, 90):
        for nseg, hi, has_qi, scatter, bd in [(1, False, False, False, 128), (3, True, True, True, 128),
                                              (4, False, True, False, 64), (2, False, False, False, 256)]:
            const = dict(NSEG=nseg, HI0=hi, HI1=False, HI2=hi, HI3=False, HAS_QI=has_qi, SCATTER=scatter,
                         BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd, BWD=False)
            w, st = launch_configs(bd)[0]
            jobs.append(job("dtk.ops.sparse.triton:_mkv_fwd", arch, _mkv_types(), const, num_warps=w, num_stages=st))
            names.append(("mkv", arch, nseg, bd))
        for has_bias in (False, True):
            jobs.append(job("dtk.ops.sparse.triton:_seg_fwd", arch, SEG_TYPES,
                            dict(HAS_BIAS=has_bias, BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, BWD=False), num_warps=8,
                            num_stages=2))
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
        jobs_b, names_b = _backward_jobs(arch)
        jobs += jobs_b
        names += names_b
    for name, res in zip(names, compile_all(jobs)):
        assert res["shared"] <= SHARED_LIMIT[name[1]], (name, res)
        if name[0] in ("mkv", "seg") and name[1] == 90 and name[-1] in (128, True, False):
            assert res["wgmma"] > 0, (name, "the Hopper build should use wgmma")
        if name[1] == 90:   # ptxas would make every wgmma wait for the previous one (C7515)
            assert not res["serialized"], (name, "wgmma pipeline serialised", res)



def _backward_jobs(arch):
    """The backward kernels at their GPU blocks (64 x 64) and launch configs."""
    from dtk.ops._attention.triton import backward_launch_configs
    jobs, names = [], []
    for bd in (64, 128):
        (wq, sq), (wk, sk) = backward_launch_configs(bd)
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=bd)
        const = dict(NSEG=3, HI0=False, HI1=True, HI2=False, HI3=False, HAS_QI=True, SCATTER=False, BWD=True, **blocks)
        jobs.append(job("dtk.ops.sparse.triton:_mkv_fwd", arch, _mkv_types(), const, num_warps=wq, num_stages=sq))
        jobs.append(job("dtk.ops.sparse.triton:_mkv_bwd_dkdv", arch, _mkv_types(),
                        dict(HAS_QI=True, HAS_IDX=True, **blocks), num_warps=wk, num_stages=sk))
        jobs.append(job("dtk.ops.sparse.triton:_seg_fwd", arch, SEG_TYPES, dict(HAS_BIAS=True, BWD=True, **blocks),
                        num_warps=wq, num_stages=sq))
        jobs.append(job("dtk.ops.sparse.triton:_seg_bwd_dkdv", arch, SEG_TYPES, dict(HAS_BIAS=True, **blocks),
                        num_warps=wk, num_stages=sk))
        names += [(n, arch, "bwd", bd) for n in ("mkv-dq", "mkv-dkdv", "seg-dq", "seg-dkdv")]
    return jobs, names
