"""The window kernel compiles for Ampere and Hopper (the interpreter skips the compiler's checks)."""
from dtk.ops.window.triton import launch_configs

from ...triton_aot import compile_all, job

PTRS = {n: "*bf16" for n in ("Q", "K", "V", "EK", "EV", "O", "DO", "DK", "DV")}
PTRS.update({"LSE": "*fp32", "LSE2": "*fp32", "DELTA": "*fp32", "QB": "*i32", "ENT": "*i32", "CNT": "*i32",
             "ORDER": "*i32", "TQ": "*i32", "TOFF": "*i32", "CT": "*i32", "qk_scale": "fp32", "dq_scale": "fp32", "dk_scale": "fp32",
             "mask_big": "fp32", "mask_floor": "fp32",
             "INWARD": "i1"})


SHARED_LIMIT = {80: 166912, 90: 232448}   # bytes per block (sm_80 / sm_90)
# the partial-block variants with the most code: boxes with the mask dots and a DEAD group (every
# loop compiled), circles testing every score of a short key shape
MASK_FLAGS = {True: dict(MASK_DOT=True, DEAD=2, MASK_F32=False, KEY_SHORT=True, LOCAL=True),
              False: dict(MASK_DOT=False, DEAD=-1, MASK_F32=False, KEY_SHORT=True, LOCAL=True)}


def test_window_kernel_compiles_with_every_launch_config():
    """Every (num_warps, num_stages) the launcher or the autotuner may pick, at the GPU blocks
    (128 x 64), fits in shared memory: a config over the limit only fails on the GPU."""
    configs = [(arch, is_box, bd, bn, w, st) for arch in (90, 80) for is_box in (True, False)
               for bd, bn in ((64, 64), (128, 64), (256, 64), (128, 128)) for w, st in launch_configs(bd, bn)]
    jobs = [job("dtk.ops.window.triton:_window_fwd", arch, PTRS,
                dict(IS_BOX=is_box, BLOCK_M=128, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=bd != 256, AXES=7, COORDS=True,
                     BWD=False, **dict(MASK_FLAGS[is_box], LOCAL=is_box or bn <= 64)), num_warps=w, num_stages=st)
            for arch, is_box, bd, bn, w, st in configs]
    results = compile_all(jobs)
    print("\n".join(f"{cfg}: {res}" for cfg, res in zip(configs, results)))
    for cfg, res in zip(configs, results):
        arch, bd, bn, w, st = cfg[0], cfg[2], cfg[3], cfg[4], cfg[5]
        if arch == 80 and (w, st) != launch_configs(bd, bn)[0] and res["shared"] > SHARED_LIMIT[80]:
            continue  # an autotuning candidate the A100 cannot launch: the autotuner skips it there
        assert res["shared"] <= SHARED_LIMIT[arch], (cfg, res)
        if arch == 90 and bd == 128:
            assert res["wgmma"] > 0, "the Hopper build should use wgmma"
        if arch == 90:   # ptxas would make every wgmma wait for the previous one (C7515)
            assert not res["serialized"], (cfg, "wgmma pipeline serialised", res)
            if (w, st) == launch_configs(bd, bn)[0] and bd <= 128:
                # spills outside the loops run once per program (Triton 3.8: ~100 bytes at 128 x 128 boxes)
                assert res["loop_spills"] == 0, (cfg, "the default config spills registers in a loop", res)
                assert res["spill_bytes"] <= 512, (cfg, "the default config spills registers", res)


def test_backward_kernels_compile():
    """The backward's dq walk (_window_fwd with BWD) and dk/dv walk at their GPU blocks (64 x 64)
    and launch configs: within shared memory on Ampere and Hopper, wgmma not serialised."""
    from dtk.ops._attention.triton import backward_launch_configs
    configs = [(arch, is_box, bd) for arch in (90, 80) for is_box in (True, False) for bd in (64, 128, 256)]
    jobs = []
    for arch, is_box, bd in configs:
        (wq, sq), (wk, sk) = backward_launch_configs(bd)
        c = dict(IS_BOX=is_box, BLOCK_M=64, BLOCK_N=64, BLOCK_D=bd, EVEN_D=bd != 256, AXES=7, COORDS=True)
        jobs.append(job("dtk.ops.window.triton:_window_fwd", arch, PTRS, dict(c, BWD=True, **MASK_FLAGS[is_box]),
                        num_warps=wq, num_stages=sq))
        jobs.append(job("dtk.ops.window.triton_backward:_window_bwd_dkdv", arch, PTRS, c, num_warps=wk, num_stages=sk))
    results = compile_all(jobs)
    for i, cfg in enumerate(configs):
        for name, res in (("dq", results[2 * i]), ("dkdv", results[2 * i + 1])):
            print(name, cfg, res)
            assert res["shared"] <= SHARED_LIMIT[cfg[0]], (name, cfg, res)
            if cfg[0] == 90:
                assert not res["serialized"], (name, cfg, "wgmma pipeline serialised", res)
                if cfg[2] == 64:
                    assert res["spill_bytes"] == 0, (name, cfg, "spills at d = 64", res)


def test_fp16_inputs_with_bf16_mask_dots_compile():
    """fp16 q/k/v: the scores' dot in fp16 and the box mask dots (bf16 on a GPU) accumulate into one
    fp32 tile, in the forward and the dq pass, on Ampere and Hopper."""
    ptrs = {**PTRS, **{n: "*fp16" for n in ("Q", "K", "V", "EK", "EV", "O", "DO")}}
    jobs = [job("dtk.ops.window.triton:_window_fwd", arch, ptrs,
                dict(IS_BOX=True, BLOCK_M=128 if not bwd else 64, BLOCK_N=64, BLOCK_D=128, EVEN_D=True, AXES=6,
                     COORDS=True, BWD=bwd, **MASK_FLAGS[True]), num_warps=8, num_stages=2)
            for arch in (90, 80) for bwd in (False, True)]
    for j, res in zip(jobs, compile_all(jobs)):
        assert res["shared"] <= SHARED_LIMIT[j["arch"]], (j, res)
        if j["arch"] == 90:
            assert res["wgmma"] > 0 and not res["serialized"] and res["loop_spills"] == 0, res


def test_single_loop_engine_is_warp_specialized_on_hopper():
    """The single-loop engine (triton_single_loop.py) at its GPU launch (64-row query blocks, 64-key blocks,
    4 warps, 2 stages), boxes and circles, 2D and 3D windows, d = 64 and 128, on sm_90: Triton
    splits the loop into producer / consumer warp groups (more warps than launched), TMA copies,
    within shared memory, wgmma not serialised, no spills."""
    from dtk.ops.window import triton_single_loop as ws
    configs = [(is_box, axes, bd) for is_box in (True, False) for axes in (6, 7) for bd in (64, 128)]
    jobs = []
    bn = ws.BLOCK_K
    for is_box, axes, bd in configs:
        types = dict(PTRS, KD=f"tensordesc<bf16[1,1,{bn},{bd}]>", VD=f"tensordesc<bf16[1,1,{bn},{bd}]>",
                     QD=f"tensordesc<bf16[1,1,{ws.BLOCK_Q},{bd}]>", WENT="*i32", WCNT="*i32")
        jobs.append(job("dtk.ops.window.triton_single_loop:_window_fwd_ws", 90, types,
                        dict(IS_BOX=is_box, BLOCK_M=ws.BLOCK_Q, BLOCK_N=bn, BLOCK_D=bd, AXES=axes, WS=True),
                        num_warps=ws.NUM_WARPS, num_stages=ws.NUM_STAGES))
    for cfg, res in zip(configs, compile_all(jobs)):
        print(cfg, res)
        assert res["warp_specialized"] and res["warps"] > ws.NUM_WARPS, (cfg, "loop not warp-specialized", res)
        assert res["tma"] > 0 and res["wgmma"] > 0 and not res["serialized"], (cfg, res)
        assert res["shared"] <= SHARED_LIMIT[90], (cfg, res)
        assert res["spill_bytes"] == 0, (cfg, "spills registers", res)
