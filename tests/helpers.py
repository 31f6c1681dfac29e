"""Shared test helpers: the correctness rule (docs/testing.md), layout and packing helpers."""
import random

import torch


def max_err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item() if a.numel() else 0.0


def assert_matches_reference(out, ref64, ref_lowp, *, atol=1e-5, name="out"):
    """FlashAttention's rule: the kernel's error against the float64 reference is at most twice
    the error of the reference evaluated in the kernel's dtype, plus atol. NaN anywhere fails."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten rows?)"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def bshd(B, S, H, D, dtype, device="cpu", transposed=False):
    """A (B,S,H,D) tensor; transposed=True gives an SDPA-layout (B,H,S,D) tensor seen as BSHD."""
    if transposed:
        return torch.randn(B, H, S, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(B, S, H, D, dtype=dtype, device=device)


def cu_seqlens(lens, device="cpu"):
    """int32 cumulative offsets (0, l0, l0+l1, ...) of packed sequence lengths."""
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def qk_lengths(n, max_len):
    """Query and key lengths of n >= 3 packed sequences, drawn apart, in a random order: one has
    queries and no keys, one keys and no queries, one neither, the others 0..max_len of each."""
    lq = [random.randint(1, max_len), 0, 0] + [random.randint(0, max_len) for _ in range(n - 3)]
    lk = [0, random.randint(1, max_len), 0] + [random.randint(0, max_len) for _ in range(n - 3)]
    order = random.sample(range(n), n)
    return [lq[i] for i in order], [lk[i] for i in order]


def record_results(monkeypatch, module, name):
    """Wraps module.name (for the test's duration) so that every call's result is appended to the
    returned list: which path a dispatcher took."""
    results = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]
    monkeypatch.setattr(module, name, wrapper)
    return results


def graph_replay_equals_eager(run, x):
    """run(x) (a GPU op on x) captured in a CUDA graph on a static copy of x (after a warm-up call
    on a side stream: cuDNN plans and Triton compiles stay outside the capture), replayed: True
    when the replay's output equals the eager output exactly."""
    eager = run(x)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(static_out, eager)
