"""benchmarks/ws_probe.py (a GPU probe for window_sweep): both variants compute dense attention,
checked in Triton's interpreter against torch (warp specialization is a no-op there)."""
import pytest
import torch

from dtk._debug import triton_interpreter_broken

from benchmarks import ws_probe


@pytest.mark.parametrize("variant", ws_probe.VARIANTS, ids=[v[0] for v in ws_probe.VARIANTS])
def test_probe_matches_sdpa(variant):
    if triton_interpreter_broken():
        pytest.skip(triton_interpreter_broken())
    _, ws, indexed, bm, bn, warps, stages = variant
    q, k, v = (torch.randn(1, 256, 2, 32, dtype=torch.float16) for _ in range(3))
    out = ws_probe.probe_fn(q, k, v, 0.2, ws, indexed, bm, bn, warps, stages)()
    ref = torch.softmax((q.float().transpose(1, 2) @ k.float().permute(0, 2, 3, 1)) * 0.2, -1) @ v.float().transpose(1, 2)
    assert out.shape == q.shape
    assert (out.float() - ref.transpose(1, 2)).abs().max() < 5e-3


def test_probe_rejects_shapes_it_does_not_cover():
    q = torch.zeros(1, 100, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of"):
        ws_probe.probe_fn(q, q, q, 0.2, True, False, 64, 128, 4, 2)


def test_probe_compiles_warp_specialized_for_hopper():
    """AOT for sm_90a (no GPU): the warp-specialized variant gets its producer / consumer warp
    groups (more warps than asked for) and wgmma; the plain one neither."""
    from ..triton_aot import compile_all, job

    jobs = []
    for _, ws, indexed, bm, bn, warps, stages in ws_probe.VARIANTS:
        types = {"desc_q": f"tensordesc<bf16[{bm},128]>", "desc_o": f"tensordesc<bf16[{bm},128]>",
                 "desc_k": f"tensordesc<bf16[{bn},128]>", "desc_v": f"tensordesc<bf16[{bn},128]>", "qk_scale": "fp32",
                 "BLOCKS": "*i32"}
        jobs.append(job("benchmarks.ws_probe:_probe_fwd", 90, types, dict(BM=bm, BN=bn, D=128, WS=ws, INDEXED=indexed),
                        num_warps=warps, num_stages=stages))
    for (_, ws, _, _, _, warps, _), res in zip(ws_probe.VARIANTS, compile_all(jobs)):
        assert res["wgmma"] > 0 and not res["serialized"], res
        assert res["warp_specialized"] == ws and (res["warps"] > warps) == ws, res
