"""MEMO's compiled Triton kernels (CUDA key of torch.ops.dtk.memory_linear_attention*) and its
any-device backward on CUDA tensors, in bf16/fp16 against the float64 reference. Runs only where a
GPU is present (the lent GPU machine)."""
import pytest
import torch

pytestmark = pytest.mark.gpu   # skipped without a GPU (conftest); selected by gpu_check's "-m gpu"

import dtk  # noqa: E402
from dtk.ops.memo.reference import memory_linear_attention_reference, memory_update_reference  # noqa: E402
from ...helpers import assert_matches_reference, bshd, max_err  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory(dtype):
    B, S, H, D = 4096, 16, 2, 64
    q, k, v = (bshd(B, S, H, D, dtype, "cuda") for _ in range(3))
    state = None
    for clip in range(3):
        o, new_state = dtk.memory_linear_attention(q, k, v, state, decay=0.9)
        mkv, mz = (None, None) if state is None else state
        ref64 = memory_linear_attention_reference(q.double(), k.double(), v.double(),
                                                  None if mkv is None else mkv.double(),
                                                  None if mz is None else mz.double(), 0.9)
        ref = memory_linear_attention_reference(q, k, v, mkv, mz, 0.9)
        assert_matches_reference(o, ref64, ref, atol=1e-3)
        rkv, rz = memory_update_reference(k.double(), v.double(), None if mkv is None else mkv.double(),
                                          None if mz is None else mz.double(), 0.9)
        assert max_err(new_state[0], rkv) < 1e-4 and max_err(new_state[1], rz) < 1e-4
        state = new_state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 128])
@pytest.mark.parametrize("with_memory", [False, True])
def test_memory_step(dtype, D, with_memory):
    """The fused kernel (the wrapper's default update) against the two kernels: another compiled
    program, so up to the output's rounding; the fp32 memory to fp32 accuracy."""
    B, S, H, Dv = 2048, 16, 2, 80   # Dv 80: two column blocks
    q, k = (bshd(B, S, H, D, dtype, "cuda") for _ in range(2))
    v = bshd(B, S, H, Dv, dtype, "cuda")
    mem = ((torch.rand(B, H, D, Dv, device="cuda"), torch.rand(B, H, D, device="cuda")) if with_memory
           else (None, None))
    out, kv, z = torch.ops.dtk.memory_linear_attention_step(q, k, v, *mem, 0.9)
    o2 = torch.ops.dtk.memory_linear_attention(q, k, v, *mem, 0.9)
    rkv, rz = torch.ops.dtk.memory_linear_attention_update(k, v, *mem, 0.9)
    assert out.dtype == dtype and kv.dtype == z.dtype == torch.float32
    assert max_err(out, o2) <= 2 ** -7 * max(1.0, o2.float().abs().max().item())
    assert max_err(kv, rkv) < 1e-5 and max_err(z, rz) < 1e-5
    ref64 = memory_linear_attention_reference(q.double(), k.double(), v.double(),
                                              *(None if t is None else t.double() for t in mem), 0.9)
    assert_matches_reference(out, ref64, memory_linear_attention_reference(q, k, v, *mem, 0.9), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", [False, True])
def test_memory_backward_gpu(dtype, update):
    """MEMO gradients (the any-device ATen kernels) on CUDA tensors equal float64 autograd on the
    CPU: the output alone, and (update) the fused step, whose loss also reads the new memory."""
    B, S, H, D = 512, 16, 2, 40
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kv = torch.rand(B, H, D, D, device="cuda", requires_grad=True)
    z = (torch.rand(B, H, D, device="cuda") + 0.1).requires_grad_()
    g, gkv, gz = torch.randn(B, S, H, D, device="cuda"), torch.randn(B, H, D, D, device="cuda"), torch.randn(
        B, H, D, device="cuda")

    def op(q, k, v, kv, z):
        out, state = dtk.memory_linear_attention(q, k, v, (kv, z), decay=0.9, update_with=update)
        return out, state if update else None

    def ref(q, k, v, kv, z):
        return (memory_linear_attention_reference(q, k, v, kv, z, decay=0.9),
                memory_update_reference(k, v, kv, z, decay=0.9) if update else None)

    def loss(att, *leaves):
        out, state = att(*leaves)
        total = (out * g.to(out.device, out.dtype)).sum()
        if state is not None:
            total = total + (state[0] * gkv.to(state[0].device, state[0].dtype)).sum() + (
                state[1] * gz.to(state[1].device, state[1].dtype)).sum()
        return total

    got = torch.autograd.grad(loss(op, q, k, v, kv, z), (q, k, v, kv, z))
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, kv, z)]
    want = torch.autograd.grad(loss(ref, *leaves), leaves)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert max_err(a.cpu(), b) <= 3e-2 * max(1.0, b.abs().max().item())


def test_memory_backward_mixed_devices():
    """The any-device MEMO backward kernels name the argument on another device than the rest
    (the dispatcher sends mixed CPU / CUDA arguments to them)."""
    q = torch.randn(2, 4, 2, 8, device="cuda")
    kv, z = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8)
    with pytest.raises(ValueError, match="memory_linear_attention_backward: mem_kv must be on cuda"):
        torch.ops.dtk.memory_linear_attention_backward(q, q, q, q, kv, z, 0.5)
    with pytest.raises(ValueError, match="memory_linear_attention_backward: grad_out must be on cuda"):
        torch.ops.dtk.memory_linear_attention_backward(q.cpu(), q, q, q, None, None, 0.5)
    with pytest.raises(ValueError, match="memory_linear_attention_update_backward: grad_kv must be on cuda"):
        torch.ops.dtk.memory_linear_attention_update_backward(kv, None, q, q, None, None, 0.5)


def test_float64_is_cpu_only():
    """The GPU kernels accumulate in float32: float64 CUDA inputs are an error naming the op."""
    q = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="memory_linear_attention: float64 is CPU-only"):
        dtk.memory_linear_attention(q, q, q, update_with=False)
    with pytest.raises(TypeError, match="memory_linear_attention_step: float64 is CPU-only"):
        dtk.memory_linear_attention(q, q, q)   # the default update: the fused op


def test_cuda_calls_record_the_triton_engine():
    q = bshd(4, 16, 2, 40, torch.bfloat16, "cuda")
    dtk.memory_linear_attention(q, q, q)
    assert dtk.last_engine("memory_linear_attention_step") == "triton"
