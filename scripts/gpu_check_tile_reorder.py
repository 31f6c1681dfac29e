"""Device check of the CUDA tile_reorder kernel against the CPU kernel / spec permutation."""
import math, sys, time
import torch
import dtk  # noqa
from dtk.ops.window.spec import tile_permutation
OP = torch.ops.dtk.tile_reorder
torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__)
fails = 0
def exp(x, grid, tile, P):
    perm, _ = tile_permutation(grid, tile, device=x.device)
    return torch.cat([x[:, :P], x[:, P:][:, perm]], 1)
cases = [((13,), (4,)), ((5, 7), (2, 3)), ((3, 5, 4), (2, 2, 3)), ((21, 30, 52), (1, 8, 16)), ((64, 64), (8, 16)), ((1, 1, 1), (1, 1, 1)), ((6, 5), (10, 1))]
for grid, tile in cases:
    for P in (0, 3):
        for dtype in (torch.bfloat16, torch.float32, torch.int8, torch.float64, torch.bool):
            for trailing in ((), (1,), (3,), (12, 128), (7, 5)):
                S = P + math.prod(grid)
                if S * math.prod(trailing) > 5e6: continue
                x = (torch.randn(2, S, *trailing, device=dev) * 10).to(dtype)
                for inv in (False, True):
                    y = OP(x, list(grid), list(tile), P, inv)
                    ref = OP(x.cpu(), list(grid), list(tile), P, inv)
                    ok = torch.equal(y.cpu(), ref)
                    if not inv: ok = ok and torch.equal(y, exp(x, grid, tile, P))
                    if not ok:
                        fails += 1; print("FAIL", grid, tile, P, dtype, trailing, inv)
# strided / misaligned inputs
for x in (torch.randn(63, 3, 2, 8, device=dev).transpose(0, 1), torch.randn(3, 63 * 7 + 1, device=dev, dtype=torch.half)[:, 1:].view(3, 63, 7),
          torch.randn(1, 63, 4, device=dev).expand(3, 63, 4), torch.randn(3, 63, 2, 16, device=dev)[..., ::2]):
    y = OP(x, [3, 5, 4], [2, 2, 3], 3, False)
    if not torch.equal(y.cpu(), OP(x.cpu(), [3, 5, 4], [2, 2, 3], 3, False)):
        fails += 1; print("FAIL strided", x.shape, x.stride())
# stream / graph-safety smoke: compile with inductor uses fake + real kernel
f = torch.compile(lambda t: OP(t, [64, 64], [8, 16], 512, False) + 1, fullgraph=True)
x = torch.randn(1, 512 + 4096, 3072, device=dev, dtype=torch.bfloat16)
torch.testing.assert_close(f(x), OP(x, [64, 64], [8, 16], 512, False) + 1)
# bandwidth: FLUX-2K-ish (B=1, 512 + 128x128 tokens, 3072 bf16 features) and Wan (21x30x52, 1536)
for (grid, tile, P, feat) in [((128, 128), (8, 16), 512, 3072), ((21, 30, 52), (1, 8, 16), 0, 1536), ((256, 256), (8, 16), 512, 3072)]:
    S = P + math.prod(grid)
    x = torch.randn(1, S, feat, device=dev, dtype=torch.bfloat16)
    perm, _ = tile_permutation(grid, tile, device=dev)
    idx = torch.cat([torch.arange(P, device=dev), P + perm])
    for name, fn in (("dtk", lambda: OP(x, list(grid), list(tile), P, False)), ("index_select", lambda: x.index_select(1, idx))):
        for _ in range(3): fn()
        torch.cuda.synchronize(); t = time.perf_counter(); n = 20
        for _ in range(n): fn()
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
        print(f"{name:12s} grid={grid} feat={feat}: {dt*1e3:.3f} ms, {2 * x.numel() * 2 / dt / 1e12:.2f} TB/s")
print("FAILS", fails)
sys.exit(1 if fails else 0)
