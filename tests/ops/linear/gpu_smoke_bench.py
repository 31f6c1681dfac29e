"""Quick GPU timing of the Triton linear-attention forward at the FLUX-4K shape (not a test; the
benchmark suite lives in benchmarks/). Usage: PYTHONPATH=python python tests/ops/linear/gpu_smoke_bench.py"""
import torch
import dtk
from dtk.ops.linear import triton as tr


def bench(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def naive(q, k, v, eps=1e-4):
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    S = torch.einsum("bshd,bshe->bhde", fk, v) / k.shape[1]
    z = fk.mean(1)
    return torch.einsum("bshd,bhde->bshe", fq, S) / (torch.einsum("bshd,bhd->bsh", fq, z) + eps)[..., None]


def tuned():
    """The configurations the autotuner picked (kernel -> key -> config)."""
    for (name, _), at in tr._TUNED.items():
        for key, cfg in getattr(at, "cache", {}).items():
            print(f"   tuned {name} {key[:5]}: {cfg}")


for S, H, D in [(66048, 24, 128), (4096, 8, 40), (16384, 10, 64), (4096, 8, 160)]:
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t = bench(lambda: dtk.linear_attention(q, k, v))
    ts = bench(lambda: tr.linear_attention_state_triton(k, v))
    st = tr.linear_attention_state_triton(k, v)
    ta = bench(lambda: tr.linear_attention_apply_triton(q, *st))
    tn = bench(lambda: naive(q, k, v))
    gb = 4 * q.numel() * 2 / 1e9
    print(f"S={S} H={H} D={D}: dtk {t*1e3:.1f} us ({gb/t:.2f} TB/s) state {ts*1e3:.1f} apply {ta*1e3:.1f} naive {tn*1e3:.1f} us")
    g = torch.randn_like(q)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    tb = bench(lambda: torch.autograd.grad(dtk.linear_attention(qr, kr, vr), (qr, kr, vr), g), 10)
    print(f"   fwd+bwd {tb*1e3:.1f} us")
    tuned()
    tr._TUNED.clear()  # print each shape's choices once
B, H, D = 64 * 64 * 2, 8, 40  # MEMO-like: pixels x batch, 16 frames
q, k, v = (torch.randn(B, 16, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
o, st = dtk.memory_linear_attention(q, k, v)
tm = bench(lambda: dtk.memory_linear_attention(q, k, v, st, update_with=False))
tu = bench(lambda: dtk.memory_linear_attention_update(k, v, st))
print(f"MEMO B={B} H={H} D={D}: attention {tm*1e3:.1f} us, update {tu*1e3:.1f} us")
