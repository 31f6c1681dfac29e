"""MEMO's Triton kernels under the interpreter (TRITON_INTERPRET=1) on CPU tensors, fp16/fp32 only
(the interpreter's bf16 tl.dot is wrong, docs/testing.md). Skipped where a GPU is present: there
test_triton_gpu.py runs the compiled kernels (the interpreter switch is process-wide)."""
import importlib.util
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

from dtk.ops.memo import engine  # noqa: E402
from dtk.ops.memo.reference import memory_linear_attention_reference, memory_update_reference  # noqa: E402
from ...helpers import assert_matches_reference, bshd, max_err  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _atol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory(dtype):
    B, S, H, D = 5, 16, 2, 40
    q, k, v = (bshd(B, S, H, D, dtype, transposed=True) for _ in range(3))
    mkv, mz = torch.rand(B, H, D, D), torch.rand(B, H, D)
    out = engine.memory_linear_attention(q, k, v, mkv, mz, 0.9)
    ref64 = memory_linear_attention_reference(q.double(), k.double(), v.double(), mkv.double(), mz.double(), 0.9)
    assert_matches_reference(out, ref64, memory_linear_attention_reference(q, k, v, mkv, mz, 0.9), atol=_atol(dtype))
    out0 = engine.memory_linear_attention(q, k, v)
    assert_matches_reference(out0, memory_linear_attention_reference(q.double(), k.double(), v.double()),
                             memory_linear_attention_reference(q, k, v), atol=_atol(dtype))
    nkv, nz = engine.memory_linear_attention_update(k[:, 5:], v[:, 5:], mkv, mz, 0.9)
    rkv, rz = memory_update_reference(k[:, 5:].double(), v[:, 5:].double(), mkv.double(), mz.double(), 0.9)
    assert max_err(nkv, rkv) < 1e-5 and max_err(nz, rz) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("S,D,Dv", [(16, 40, 40), (7, 24, 80), (0, 16, 16)])   # Dv 80: two column blocks
def test_memory_step(dtype, with_memory, S, D, Dv):
    """The fused kernel's (out, kv, z) are bitwise those of the two kernels (a result it leaves
    unwritten stays NaN, DTK_DEBUG_NAN_FILL, and fails the comparison)."""
    B, H = 3, 2
    q, k = (bshd(B, S, H, D, dtype, transposed=True) for _ in range(2))
    v = bshd(B, S, H, Dv, dtype)
    mem = (torch.rand(B, H, D, Dv), torch.rand(B, H, D)) if with_memory else (None, None)
    out, kv, z = engine.memory_linear_attention_step(q, k, v, *mem, 0.9)
    assert torch.equal(out, engine.memory_linear_attention(q, k, v, *mem, 0.9))
    rkv, rz = engine.memory_linear_attention_update(k, v, *mem, 0.9)
    assert torch.equal(kv, rkv) and torch.equal(z, rz)
    assert kv.dtype == z.dtype == torch.float32


@pytest.mark.parametrize("clips", [2, 4])
def test_memory_step_several_clips_per_program(clips):
    """CLIPS > 1 (a linear_sweep variant): B*H = 7 clips, not a multiple, so the last program
    redoes the last clip; the results are bitwise the one-clip-per-program launch's."""
    B, H, S, D = 7, 1, 16, 24
    q, k, v = (bshd(B, S, H, D, torch.float32) for _ in range(3))
    mem = (torch.rand(B, H, D, D), torch.rand(B, H, D))
    want = engine.memory_linear_attention_step(q, k, v, *mem, 0.9)
    cfg = dict(engine.launch_config("memory_step", D, D, S), CLIPS=clips)
    got = engine.memory_linear_attention_step(q, k, v, *mem, 0.9, cfg=cfg)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
