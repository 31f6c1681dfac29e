"""QK-norm + rotary embedding (`dtk.rms_norm_rope`): what FLUX runs on q and k before every
attention. Memory-bound: read the GB/s and `% copy` columns (the op reads x and writes the result
once; the work column counts those bytes only).

Implementations, on the same (B, S, H, D) tensor (a slice of a fused qkv projection, as the model's):
  dtk           the op (CPU: C++ kernel; CUDA: Triton); checked against the float64 reference.
  diffusers     what FLUX's attention processor runs: torch.nn.RMSNorm (diffusers >= 0.36) then
                diffusers' apply_rotary_emb; checked.
  torch-compile the same composition under torch.compile (GPU only: what a user compiling the model
                gets); checked.
  copy          x.contiguous() of the slice: the same bytes, the floor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..registry import Case, CheckResult, Impl, Prepared, Skip, first_call, register

OP = "rotary"


@dataclass(frozen=True)
class RopeShape:
    name: str
    B: int
    S: int
    H: int
    D: int
    note: str = ""


CPU_SHAPES = [RopeShape("flux-32x32-S1088-H4-d64", 1, 1088, 4, 64, note="a small FLUX-like q")]
GPU_SHAPES = [
    RopeShape("flux4k-S66048-H24-d128", 1, 66048, 24, 128, note="FLUX 4096^2: 256^2 image + 512 text tokens"),
    RopeShape("flux2k-S16896-H24-d128", 1, 16896, 24, 128, note="FLUX 2048^2: 128^2 image + 512 text tokens"),
]
EPS = 1e-6


def make_setup(sh: RopeShape):
    def setup(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(sh.B, sh.S, 3 * sh.H * sh.D, generator=g).to(device=device, dtype=dtype)
        x = qkv[..., :sh.H * sh.D].unflatten(-1, (sh.H, sh.D))
        ang = torch.rand(sh.S, sh.D // 2, generator=g, dtype=torch.float64) * 100
        cos, sin = (t.repeat_interleave(2, -1).to(device=device, dtype=torch.float32) for t in (ang.cos(), ang.sin()))
        w = (torch.rand(sh.D, generator=g) + 0.5).to(device=device, dtype=dtype)
        return dict(shape=sh, device=device, x=x, w=w, cos=cos, sin=sin)
    return setup


def check(state, out) -> CheckResult:
    from dtk.ops.rotary.reference import rms_norm_rope_reference
    x, w, cos, sin = state["x"], state["w"], state["cos"], state["sin"]
    rows = torch.arange(0, x.shape[1], max(1, x.shape[1] // 256), device=x.device)
    ref64 = rms_norm_rope_reference(x[:, rows].double(), w, cos[rows], sin[rows], EPS)
    lowp = rms_norm_rope_reference(x[:, rows], w, cos[rows], sin[rows], EPS, compute_dtype=x.dtype)
    err = (out[:, rows].double() - ref64).abs().nan_to_num(nan=float("inf")).max().item()
    tol = 2 * (lowp.double() - ref64).abs().max().item() + 1e-5
    return CheckResult(tuple(out.shape) == tuple(x.shape) and err <= tol, err, tol, int(rows.numel()),
                       "float64 reference (docs/testing.md rule)")


def _prep_dtk(state):
    import dtk
    x, w, cos, sin = state["x"], state["w"], state["cos"], state["sin"]
    fn = lambda: dtk.rms_norm_rope(x, w, cos, sin, eps=EPS)  # noqa: E731
    return Prepared(fn, first_call(fn, state["device"], "rms_norm_rope"))


def _composition(state):
    try:
        from diffusers.models.embeddings import apply_rotary_emb
    except Exception as e:
        raise Skip(f"diffusers not importable here ({type(e).__name__})")
    x, w, cos, sin = state["x"], state["w"], state["cos"], state["sin"]
    norm = torch.nn.RMSNorm(x.shape[-1], eps=EPS, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    return lambda t: apply_rotary_emb(norm(t), (cos, sin), sequence_dim=1)


def _prep_diffusers(state):
    f, x = _composition(state), state["x"]
    return Prepared(lambda: f(x))


def _prep_compile(state):
    f, x = _composition(state), state["x"]
    fc = torch.compile(f, dynamic=False)
    fn = lambda: fc(x)  # noqa: E731
    return Prepared(fn, first_call(fn, state["device"], "torch.compile"))


def _prep_copy(state):
    x = state["x"]
    return Prepared(lambda: x.contiguous())


def make_case(sh: RopeShape, gpu: bool) -> Case:
    dtype = "bfloat16" if gpu else "float32"
    eb = 2 if gpu else 4
    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True),
             Impl("diffusers", _prep_diffusers, check=True, note="torch.nn.RMSNorm + diffusers apply_rotary_emb"),
             Impl("torch-compile", _prep_compile, check=True, devices=("cuda",), cost_hint_s=30.0,
                  note="the same composition under torch.compile"),
             Impl("copy", _prep_copy, note="x.contiguous(): the same bytes, no math")]
    return Case(op=OP, shape=sh.name, params={k: v for k, v in asdict(sh).items() if k not in ("name", "note")},
                setup=make_setup(sh), impls=impls, check=check,
                work=lambda: (0.0, 2.0 * sh.B * sh.S * sh.H * sh.D * eb), dtype=dtype, gpu=gpu, note=sh.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
