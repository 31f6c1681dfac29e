"""Smoke test of an *installed* dtk (a wheel in a venv), not the source tree.

    cd "$(mktemp -d)" && /path/to/venv/bin/python /path/to/dtk/scripts/wheel_smoke.py [--wheel dist/dtk-*.whl]

Checks that dtk was imported from the environment's site-packages (never from a checkout), calls
every public op on tiny CPU tensors against its pure-torch reference (float64 and float32),
checks every op has a CUDA kernel registered (Triton / CUDA C++ / torch fallback: what a GPU
machine dispatches to, whatever the wheel was built with), runs the Triton kernels shipped in the
wheel under the Triton interpreter on CPU tensors, and runs ``python -m dtk``. On a machine with
a GPU it also runs every op on CUDA tensors. Prints one line per check and a closing
"N passed, N failed" line; exits 1 on any failure.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
import traceback

import torch

RESULTS = []


def check(name):
    def deco(fn):
        t = time.perf_counter()
        try:
            fn()
            RESULTS.append((name, True, ""))
            print(f"ok    {name} ({time.perf_counter() - t:.2f} s)", flush=True)
        except Exception as e:  # report every failure, keep going
            RESULTS.append((name, False, repr(e)))
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        return fn
    return deco


def close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item()) if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# ------------------------------------------------------------------------------------ location
WHEEL = sys.argv[sys.argv.index("--wheel") + 1] if "--wheel" in sys.argv else None

import dtk  # noqa: E402

SITE = os.path.realpath(sysconfig.get_paths()["purelib"])
PLAT = os.path.realpath(sysconfig.get_paths()["platlib"])


@check("dtk is imported from the installed wheel")
def _where():
    f = os.path.realpath(dtk.__file__)
    target = os.environ.get("DTK_SMOKE_SITE")      # a `pip install --target DIR` install (gpu_check_wheel.sh)
    if target:
        assert f.startswith(os.path.realpath(target) + os.sep), f"dtk imported from {f}, not from {target}"
    else:
        assert f.startswith((SITE + os.sep, PLAT + os.sep)), f"dtk imported from {f}, not from {SITE}"
        assert os.path.realpath(sys.prefix) != os.path.realpath(getattr(sys, "base_prefix", sys.prefix)), \
            "not running in a virtual environment"
    so = [n for n in os.listdir(os.path.dirname(f)) if n.startswith("_C") and n.endswith((".so", ".pyd"))]
    assert so, "dtk/_C extension missing from the install"
    from importlib.metadata import files, version   # (finds the --target dir too: it is on sys.path)
    assert version("dtk") == dtk.__version__, (version("dtk"), dtk.__version__)
    names = [str(p) for p in files("dtk")]          # the installed RECORD (pip adds the .pyc files)
    if WHEEL:                                       # the wheel itself, when given
        import zipfile
        names = zipfile.ZipFile(WHEEL).namelist()
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], "bytecode in the wheel"
    assert all(n.startswith(("dtk/", "dtk-")) for n in names), [n for n in names if not n.startswith("dtk")][:5]
    junk = [n for n in names if any(s in n for s in ("tests/", "benchmarks/", "csrc/", "third_party/", "CMake",
                                                      "build/")) or n.endswith((".cu", ".cpp", ".h", ".o", ".ninja"))]
    assert not junk, f"unexpected files in the wheel: {junk[:5]}"


# ------------------------------------------------------------------------------------ ops on CPU
def window_cases(device, dtype):
    from dtk.ops.window.reference import window_attention_reference
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    cases = [dict(grid=(5, 7), window=(3, 5), num_prefix=2),
             dict(grid=(6, 6), radius=3, border="clip", num_prefix=3, tile=(2, 4)),
             dict(grid=(3, 4, 5), window=(-1, 3, 3), tile=(1, 2, 4))]
    for c in cases:
        S = c.get("num_prefix", 0) + math.prod(c["grid"])
        q, k, v = mk(2, S, 4, 64), mk(2, S, 2, 64), mk(2, S, 2, 64)
        kw = {x: y for x, y in c.items() if x not in ("grid", "window")}
        out, lse = dtk.window_attention(q, k, v, c["grid"], c.get("window"), return_lse=True, **kw)
        ref, ref_lse = window_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), c["grid"],
                                                  c.get("window"), **kw)
        yield c, out, lse, ref, ref_lse


def run_window(device="cpu", dtypes=(torch.float64, torch.float32), tol=None):
    for dtype in dtypes:
        t = tol or (1e-9 if dtype == torch.float64 else 2e-5)
        for c, out, lse, ref, ref_lse in window_cases(device, dtype):
            close(out.cpu(), ref, t, f"window_attention {c} {dtype}")
            close(lse.cpu(), ref_lse, max(t, 1e-5), f"window_attention lse {c} {dtype}")


@check("window_attention (CPU) vs reference")
def _window():
    run_window()


@check("tile_permutation, to_tile_order, from_tile_order (CPU)")
def _layout():
    for grid, tile, P in [((13,), (4,), 0), ((5, 7), (2, 3), 3), ((3, 5, 4), (2, 2, 3), 1)]:
        perm, inv = dtk.tile_permutation(grid, tile)
        n = math.prod(grid)
        assert torch.equal(perm[inv], torch.arange(n)) and sorted(perm.tolist()) == list(range(n))
        x = torch.randn(2, P + n, 3, 2)
        y = dtk.to_tile_order(x, grid, tile, num_prefix=P)
        assert torch.equal(y, torch.cat([x[:, :P], x[:, P:][:, perm]], 1))
        assert torch.equal(dtk.from_tile_order(y, grid, tile, num_prefix=P), x)
        # the torch kernel that serves CUDA tensors when the CUDA C++ kernel was not compiled
        from dtk.ops.layout import tile_reorder_torch
        for inverse in (False, True):
            assert torch.equal(tile_reorder_torch(x, list(grid), list(tile), P, inverse),
                               torch.ops.dtk.tile_reorder(x, list(grid), list(tile), P, inverse))


def run_linear(device="cpu", dtypes=(torch.float64, torch.float32), tol=None):
    from dtk.ops.linear import reference as R
    from dtk.ops.memo import reference as MR
    for dtype in dtypes:
        t = tol or (1e-9 if dtype == torch.float64 else 2e-5)
        mk = lambda *s: torch.randn(*s, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
        q, k, v = mk(2, 37, 4, 40), mk(2, 29, 2, 40), mk(2, 29, 2, 24)
        d = lambda x: x.double().cpu()  # noqa: E731
        for fm, norm in (("elu1", True), ("relu", False)):
            out = dtk.linear_attention(q, k, v, feature_map=fm, normalize=norm)
            close(out.cpu(), R.linear_attention_reference(d(q), d(k), d(v), fm, norm), t,
                  f"linear_attention {fm} normalize={norm} {dtype}")
        st = dtk.linear_attention_state(k, v)
        rst = R.linear_attention_state_reference(d(k), d(v))
        for a, b, nm in zip(st, rst, ("kv_sum", "k_sum", "count")):
            close(a.cpu(), b, t, f"linear_attention_state {nm} {dtype}")
        close(dtk.linear_attention_apply(q, *st).cpu(), R.linear_attention_apply_reference(d(q), *rst), t,
              f"linear_attention_apply {dtype}")
        cu = torch.tensor([0, 11, 11, 30], dtype=torch.int32, device=device)
        qp, kp, vp = mk(1, 30, 2, 40), mk(1, 30, 2, 40), mk(1, 30, 2, 40)
        close(dtk.linear_attention(qp, kp, vp, cu_seqlens=cu).cpu(),
              R.linear_attention_reference(d(qp), d(kp), d(vp), cu_seqlens=cu.cpu()), t, f"linear_attention varlen {dtype}")
        mq, mk_, mv = mk(64, 16, 2, 40), mk(64, 16, 2, 40), mk(64, 16, 2, 40)
        out, state = dtk.memory_linear_attention(mq, mk_, mv)
        close(out.cpu(), MR.memory_linear_attention_reference(d(mq), d(mk_), d(mv)), t, f"memory_linear_attention {dtype}")
        out2, state2 = dtk.memory_linear_attention(mq, mk_, mv, state, update_with=4)
        rkv, rz = MR.memory_update_reference(d(mk_), d(mv))
        close(out2.cpu(), MR.memory_linear_attention_reference(d(mq), d(mk_), d(mv), rkv, rz), t,
              f"memory_linear_attention with state {dtype}")
        kv, z = dtk.memory_linear_attention_update(mk_, mv, state)
        rkv2, rz2 = MR.memory_update_reference(d(mk_), d(mv), rkv, rz)
        close(kv.cpu(), rkv2, t, f"memory_linear_attention_update kv {dtype}")
        close(z.cpu(), rz2, t, f"memory_linear_attention_update z {dtype}")


@check("linear family (CPU) vs reference: linear_attention[_state|_apply], memory_linear_attention[_update]")
def _linear():
    run_linear()


@check("linear_attention and memory_linear_attention backward (CPU) vs autograd through the references")
def _linear_grad():
    from dtk.ops.linear.reference import linear_attention_reference
    q, k, v = (torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    got = torch.autograd.grad(dtk.linear_attention(q, k, v), (q, k, v), g)
    want = torch.autograd.grad(linear_attention_reference(q, k, v), (q, k, v), g)
    for a, b, n in zip(got, want, "qkv"):
        close(a, b, 1e-9, f"d{n}")
    from dtk.ops.memo.reference import memory_linear_attention_reference
    mem = (torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True),
           (torch.rand(1, 2, 8, dtype=torch.float64) + 0.1).requires_grad_())
    got = torch.autograd.grad(dtk.memory_linear_attention(q, k, v, mem, update_with=False)[0], (q, k, v, *mem), g)
    want = torch.autograd.grad(memory_linear_attention_reference(q, k, v, *mem), (q, k, v, *mem), g)
    for a, b, n in zip(got, want, ("q", "k", "v", "mem_kv", "mem_z")):
        close(a, b, 1e-9, f"memory_linear_attention d{n}")


def run_attention_grads(device="cpu", dtype=torch.float64, tol=1e-9):
    """Gradients of window_attention, multi_kv_attention and segment_attention (the backward ops)
    against autograd through the references."""
    from dtk.ops.sparse.reference import multi_kv_attention_reference, segment_attention_reference
    from dtk.ops.window.reference import window_attention_reference
    mk = lambda *s: torch.randn(*s, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(1, 2 + 30, 4, 64), mk(1, 2 + 30, 2, 64), mk(1, 2 + 30, 2, 64)
    cases = [
        ("window_attention", lambda q, k, v: dtk.window_attention(q, k, v, (5, 6), radius=2, num_prefix=2),
         lambda q, k, v: window_attention_reference(q, k, v, (5, 6), radius=2, num_prefix=2)[0]),
        ("multi_kv_attention", lambda q, k, v: dtk.multi_kv_attention(q, [k[:, :9], k[:, 9:]], [v[:, :9], v[:, 9:]]),
         lambda q, k, v: multi_kv_attention_reference(q, [k[:, :9], k[:, 9:]], [v[:, :9], v[:, 9:]])[0]),
        ("segment_attention", lambda q, k, v: dtk.segment_attention(q, k, v, [0, 2, 20, 32],
                                                                     dtk.ominicontrol_group_mask(1)),
         lambda q, k, v: segment_attention_reference(q, k, v, [0, 2, 20, 32], dtk.ominicontrol_group_mask(1))[0]),
    ]
    g = mk(1, 32, 4, 64)
    for name, op, ref in cases:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad(op(*leaves), leaves, g)
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ref(*leaves), leaves, g.cpu().double())
        for a, b, n in zip(got, want, "qkv"):
            close(a.cpu(), b, tol, f"{name} d{n} {dtype}")


@check("attention backward (CPU): window, multi_kv, segment vs autograd through the references")
def _attention_grads():
    run_attention_grads()


def run_sparse(device="cpu", dtypes=(torch.float64, torch.float32), tol=None):
    from dtk.ops.sparse.reference import multi_kv_attention_reference, segment_attention_reference
    for dtype in dtypes:
        t = tol or (1e-9 if dtype == torch.float64 else 2e-5)
        mk = lambda *s: torch.randn(*s, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
        c = lambda x: x.double().cpu()  # noqa: E731
        q = mk(2, 20, 4, 64)
        ks, vs = [mk(2, 7, 2, 64), mk(2, 12, 2, 64)], [mk(2, 7, 2, 64), mk(2, 12, 2, 64)]
        kv_index = [None, torch.tensor([0, 3, -1, 11], device=device)]
        q_index = torch.tensor([[0, 5, 19, -1], [2, 2, 7, 8]], device=device)
        out, lse = dtk.multi_kv_attention(q, ks, vs, kv_index=kv_index, q_index=q_index, return_lse=True)
        ref, ref_lse = multi_kv_attention_reference(c(q), [c(k) for k in ks], [c(v) for v in vs],
                                                    [None, kv_index[1].cpu()], q_index.cpu())
        close(out.cpu(), ref, t, f"multi_kv_attention {dtype}")
        close(lse.cpu()[ref_lse.isfinite()], ref_lse[ref_lse.isfinite()], max(t, 1e-5), f"multi_kv_attention lse {dtype}")
        base = mk(2, 20, 4, 64)
        got = dtk.multi_kv_attention(q, ks, vs, q_index=q_index, out=base.clone())
        want, _ = multi_kv_attention_reference(c(q), [c(k) for k in ks], [c(v) for v in vs], None, q_index.cpu(),
                                               out=c(base))
        close(got.cpu(), want, t, f"multi_kv_attention out= {dtype}")
        cu, gm = [0, 4, 12, 16, 20], dtk.ominicontrol_group_mask(2, device=device)
        k, v = mk(2, 20, 2, 64), mk(2, 20, 2, 64)
        out = dtk.segment_attention(q, k, v, cu, gm)
        ref, _ = segment_attention_reference(c(q), c(k), c(v), cu, gm.cpu())
        close(out.cpu(), ref, t, f"segment_attention {dtype}")


@check("sparse family (CPU) vs reference: multi_kv_attention (+ out=, q_index, kv_index), segment_attention")
def _sparse():
    run_sparse()


@check("cache family (CPU) vs reference: scatter_blend, token_change_score, mask_to_index, dilate/prune, KVCache")
def _cache():
    from dtk.ops.reuse import reference as C
    base, cache, fresh = torch.randn(2, 10, 3), torch.randn(2, 10, 3), torch.randn(2, 4, 3)
    index = torch.tensor([[1, 4, 7, -1], [0, 2, 9, 5]])
    want_out, want_cache = C.scatter_blend_reference(base, cache, fresh, index, 0.3)
    got_cache = cache.clone()
    out = dtk.scatter_blend(base, got_cache, fresh, index, 0.3)
    close(out, want_out, 1e-6, "scatter_blend out")
    close(got_cache, want_cache, 0, "scatter_blend cache (in place)")
    feats, refs = [torch.randn(2, 8, 6, 6), torch.randn(2, 4, 3, 3)], [torch.randn(2, 8, 6, 6), torch.randn(2, 4, 3, 3)]
    close(dtk.token_change_score(feats, refs, 2), C.token_change_score_reference(feats, refs, 2), 1e-5,
          "token_change_score")
    m = torch.rand(2, 6, 7) > 0.6
    for got, want, n in ((dtk.mask_to_index(m, num_prefix=3), C.mask_to_index_reference(m.flatten(1), None, 3),
                          "mask_to_index"),):
        for a, b in zip(got, want):
            assert torch.equal(a.long(), b.long()), n
    assert torch.equal(dtk.dilate_mask(m, 2), C.dilate_mask_reference(m, 2)), "dilate_mask"
    assert torch.equal(dtk.prune_isolated(m, 2), C.prune_isolated_reference(m, 2)), "prune_isolated"
    kvc = dtk.cache.KVCache()
    k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    kvc.write(0, k, v)
    rk, rv = kvc.read(0)
    assert torch.equal(rk, k) and torch.equal(rv, v) and 0 in kvc


@check("rotary family (CPU) vs reference: rms_norm_rope")
def _rotary():
    from dtk.ops.rotary.reference import rms_norm_rope_reference
    x, w = torch.randn(2, 5, 3, 8), torch.randn(8)
    ang = torch.randn(5, 4)
    cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    for interleaved in (True, False):
        close(dtk.rms_norm_rope(x, w, cos, sin, interleaved=interleaved),
              rms_norm_rope_reference(x, w, cos, sin, interleaved=interleaved), 1e-5, "rms_norm_rope")


@check("dtk.adapters imports (model glue; diffusers is only needed to apply it)")
def _adapters():
    import importlib
    importlib.import_module("dtk.adapters")


@check("every dtk op has CPU and CUDA kernels registered")
def _dispatch():
    info = dtk.info(quiet=True)
    ops = info["ops"]
    assert {"window_attention", "tile_reorder", "linear_attention", "memory_linear_attention"} <= set(ops), ops
    public = [n for n in dtk.__all__ if n not in ("info", "cache")]
    assert all(callable(getattr(dtk, n)) for n in public), public
    missing = [f"{op}:{key}" for op, k in ops.items() for key in ("cpu", "cuda") if not k[key]]
    assert not missing, f"no kernel for {missing}"
    assert info["engines"]["cpp_cpu"]["ok"] and info["engines"]["reference"]["ok"]


@check("the CUDA C++ kernels are in the wheel exactly when it was built with them")
def _cuda_cpp():
    from dtk import _C
    built_with = os.environ.get("DTK_WITH_CUDA")   # set by scripts/wheel_check.sh for the build it made
    if built_with is None:
        return
    eng = dtk.info(quiet=True)["engines"]["cuda_cpp"]
    assert bool(getattr(_C, "with_cuda", 0)) == (built_with == "1") == eng["ok"], (built_with, eng)
    if built_with == "1":
        assert "sm_90a" in str(eng["archs"]) or "90a" in str(eng["archs"]), eng
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dtk::tile_reorder", "CUDA")


@check("python -m dtk")
def _main():
    r = subprocess.run([sys.executable, "-m", "dtk"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"dtk {dtk.__version__}" in r.stdout and "C++ CPU kernels" in r.stdout and "Triton" in r.stdout, r.stdout
    print(textwrap.indent(r.stdout.rstrip(), "      | "))


# Triton kernels from the wheel, on CPU tensors under the interpreter (a fresh process: the switch
# must be set before Triton is imported). Proves the shipped Triton sources import and compute.
_INTERPRET = r"""
import math, torch, dtk
from dtk.ops.linear import engine as LT, reference as LR
from dtk.ops.window import engine as WT, reference as WR
from dtk.ops.window.spec import make_spec
q, k, v = (torch.randn(1, 33, 2, 32) for _ in range(3))
o = LT.linear_attention(q, k, v)
r = LR.linear_attention_reference(q.double(), k.double(), v.double())
assert (o.double() - r).abs().max().item() < 1e-4, "linear triton"
spec = make_spec((5, 6), (3, 3), None, "inward", 2, None)
q, k, v = (torch.randn(1, 32, 2, 32) for _ in range(3))
o, lse = WT.window_attention_triton(q, k, v, spec, 1 / math.sqrt(32))
r, _ = WR.window_attention_reference(q.double(), k.double(), v.double(), (5, 6), (3, 3), num_prefix=2)
assert (o.double() - r).abs().max().item() < 1e-4, "window triton"
print("triton interpreter ok")
"""


@check("Triton kernels of the wheel under TRITON_INTERPRET=1 (CPU tensors)")
def _interp():
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        print("      (triton not installed: skipped)")
        return
    from dtk._debug import triton_interpreter_broken
    if triton_interpreter_broken():
        print(f"      (skipped: {triton_interpreter_broken()})")
        return
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", _INTERPRET], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "triton interpreter ok" in r.stdout, (r.stdout + r.stderr)[-3000:]


# ------------------------------------------------------------------------------------ GPU (when present)
if torch.cuda.is_available():
    @check("window_attention (CUDA, fp16/bf16) vs reference")
    def _window_gpu():
        run_window("cuda", (torch.float16, torch.bfloat16), tol=3e-2)

    @check("linear family (CUDA, fp32/fp16) vs reference")
    def _linear_gpu():
        run_linear("cuda", (torch.float32,), tol=1e-3)
        run_linear("cuda", (torch.float16,), tol=3e-2)

    @check("sparse family (CUDA, fp16/bf16) vs reference")
    def _sparse_gpu():
        run_sparse("cuda", (torch.float16, torch.bfloat16), tol=3e-2)

    @check("attention backward (CUDA, Triton, bf16) vs autograd through the references")
    def _attention_grads_gpu():
        run_attention_grads("cuda", torch.bfloat16, tol=5e-2)

    @check("tile_reorder (CUDA) vs CPU")
    def _layout_gpu():
        x = torch.randn(2, 3 + 35, 8)
        for inv in (False, True):
            assert torch.equal(torch.ops.dtk.tile_reorder(x.cuda(), [5, 7], [2, 3], 3, inv).cpu(),
                               torch.ops.dtk.tile_reorder(x, [5, 7], [2, 3], 3, inv))


passed = sum(1 for _, ok, _ in RESULTS if ok)
failed = len(RESULTS) - passed
print(f"wheel_smoke: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
