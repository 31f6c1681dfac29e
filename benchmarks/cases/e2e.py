"""End to end: one transformer forward of a diffusers model with random weights, dense (the model
as diffusers ships it) vs adapted with dtk (``dtk.adapters``). Reports seconds per forward (the
ms column) and the speedup (dtk x) against the model as shipped and, on a GPU, against the same
model with SDPA held to cuDNN (the fastest dense backend at these shapes, the issues' anchor). For
FLUX a third anchor, dense-cudnn-dtk-glue, runs dense attention inside the adapter's glue (QK-norm +
RoPE fused by dtk.rms_norm_rope): dtk x against it is the window attention's share of the speedup
alone, against diffusers-dense-cudnn the whole adapter's. No downloads: models are built from configs.

GPU set (bf16): a FLUX.1-dev-shaped transformer (19 joint + 38 single blocks, 24 heads x 128) at
2048^2 and 4096^2 (128^2 / 256^2 image tokens + 512 text), dense vs
``apply_local_attention(radius=16)`` (row-major and 8x16 tiles); a Wan2.1-1.3B-shaped transformer
(30 layers, 12 heads x 128) at 1088x1920, 81 frames (21x68x120 tokens), dense vs
``apply_inward_window((-1, 31, 53))``. CPU set (fp32): the same comparisons on tiny configs.

Needs diffusers: without it every row is skipped with that reason (the GPU machine may not have it).
The check of an e2e row is only "right shape, finite": adapter correctness is tested in
tests/adapters. FLOPs are not counted for these rows (effective TFLOP/s columns read 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch

from ..registry import Case, CheckResult, Impl, Prepared, Skip, register

OP = "e2e"


@dataclass(frozen=True)
class E2EShape:
    name: str
    model: str                       # "flux" | "wan"
    config: Dict[str, Any] = field(hash=False)
    grid: Tuple[int, ...] = ()       # FLUX: (H, W) image tokens; Wan: (T, H, W) tokens
    text: int = 512
    adapter: Dict[str, Any] = field(default_factory=dict, hash=False)   # apply_* kwargs
    variants: Tuple[Tuple[str, Dict[str, Any]], ...] = ()                # extra dtk rows: (suffix, kwargs)
    slow: bool = False
    note: str = ""


FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6,
                rope_max_seq_len=1024)
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(8, 12, 12))
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
                rope_max_seq_len=64)

CPU_SHAPES = [
    E2EShape("flux-tiny-32x32", "flux", FLUX_TINY, grid=(32, 32), text=16, adapter=dict(radius=4),
             variants=(("tile8x8", dict(radius=4, tile=(8, 8))),)),
    E2EShape("wan-tiny-4x16x24", "wan", WAN_TINY, grid=(4, 16, 24), text=16, adapter=dict(window=(-1, 7, 9)),
             variants=(("tile2x4x8", dict(window=(-1, 7, 9), tile=(2, 4, 8))),)),
]
GPU_SHAPES = [
    E2EShape("flux-dev-2048", "flux", FLUX_DEV, grid=(128, 128), adapter=dict(radius=16),
             variants=(("tile8x16", dict(radius=16, tile=(8, 16))),), note="FLUX.1-dev shape at 2048^2, CLEAR r=16"),
    E2EShape("flux-dev-4096", "flux", FLUX_DEV, grid=(256, 256), adapter=dict(radius=16),
             variants=(("tile8x16", dict(radius=16, tile=(8, 16))), ("tile16x8", dict(radius=16, tile=(16, 8)))),
             slow=True, note="FLUX.1-dev shape at 4096^2, CLEAR r=16"),
    E2EShape("wan1.3b-1088x1920x81", "wan", WAN_1_3B, grid=(21, 68, 120), adapter=dict(window=(-1, 31, 53)),
             variants=(("tile21x3x2", dict(window=(-1, 31, 53), tile=(21, 3, 2))),),
             slow=True, note="Wan2.1-1.3B shape, FreeSwim 1080p window"),
]


def _diffusers():
    try:
        import diffusers  # noqa: F401
        import dtk.adapters  # noqa: F401
    except Exception as e:
        raise Skip(f"diffusers not importable here ({type(e).__name__}: {e}); pip install 'dtk[adapters]'"[:200])
    return diffusers


def _build(shape: E2EShape, device, dtype):
    diffusers = _diffusers()
    cls = diffusers.FluxTransformer2DModel if shape.model == "flux" else diffusers.WanTransformer3DModel
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)           # build directly in the run's dtype on the device (no fp32 copy)
    try:
        with torch.device(device), torch.no_grad():
            model = cls(**shape.config)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def _inputs(shape: E2EShape, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    c = shape.config
    if shape.model == "flux":
        H, W = shape.grid
        ids = torch.zeros(H * W, 3)
        ids[:, 1] = torch.arange(H).repeat_interleave(W)
        ids[:, 2] = torch.arange(W).repeat(H)
        return dict(hidden_states=rnd(1, H * W, c["in_channels"]),
                    encoder_hidden_states=rnd(1, shape.text, c["joint_attention_dim"]),
                    pooled_projections=rnd(1, c["pooled_projection_dim"]),
                    timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                    guidance=torch.full((1,), 3.5, device=device, dtype=dtype) if c.get("guidance_embeds") else None,
                    img_ids=ids.to(device=device, dtype=dtype), txt_ids=torch.zeros(shape.text, 3, device=device, dtype=dtype),
                    return_dict=False)
    T, H, W = shape.grid
    pt, ph, pw = c["patch_size"]
    return dict(hidden_states=rnd(1, c["in_channels"], T * pt, H * ph, W * pw),
                timestep=torch.full((1,), 500, device=device, dtype=torch.long),
                encoder_hidden_states=rnd(1, shape.text, c["text_dim"]), return_dict=False)


def make_setup(shape: E2EShape):
    def setup(device, dtype):
        state: Dict[str, Any] = dict(shape=shape, device=device)
        try:
            _diffusers()
        except Skip as e:
            state["skip"] = str(e)             # every row is then skipped with this reason
            return state
        t = time.perf_counter()
        state["model"] = _build(shape, device, dtype)
        state["inputs"] = _inputs(shape, device, dtype)
        state["build_s"] = round(time.perf_counter() - t, 2)
        return state
    return setup


def _forward(state):
    model, x = state["model"], state["inputs"]

    def fn():
        with torch.no_grad():
            return model(**x)[0]
    return fn


def _first_call(state, fn, info):
    t = time.perf_counter()
    fn()
    if state["device"].startswith("cuda"):
        torch.cuda.synchronize()
    info["first_call_s"] = round(time.perf_counter() - t, 2)
    return Prepared(fn, info)


def _unadapted(state):
    """The shape's model with any earlier row's adapter removed (or the setup's skip reason)."""
    if "skip" in state:
        raise Skip(state["skip"])
    import dtk.adapters
    dtk.adapters.remove(state["model"])
    if "restore" in state:                 # an earlier row's benchmark-only processors
        state.pop("restore")()
    return state["model"]


def _prep_dense(state):
    _unadapted(state)
    return _first_call(state, _forward(state), {"build_s": state["build_s"]})


def _prep_dense_cudnn(state):
    """The unadapted model with SDPA held to its cuDNN backend (diffusers' default attention calls
    torch SDPA, whose own choice at these shapes is another backend): the issue's 'dense cuDNN'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _unadapted(state)
    inner = _forward(state)

    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return inner()
    return _first_call(state, fn, {})


class _DenseWithDtkGlue:
    """FLUX attention with the adapters' glue (flux_qkv: QK-norm + RoPE in one dtk.rms_norm_rope
    pass) around dense SDPA: the anchor that separates what the fused glue gives from what the
    window attention gives (dtk x against it is the attention's share alone)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        from dtk.adapters.flux import flux_out, flux_qkv
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return flux_out(attn, out.transpose(1, 2), encoder_hidden_states)


def _prep_dense_dtk_glue(state):
    """The unadapted FLUX model with _DenseWithDtkGlue processors (SDPA held to cuDNN on a GPU)."""
    from dtk.adapters.flux import iter_flux_attention
    model = _unadapted(state)
    layers = [attn for _, attn in iter_flux_attention(model)]
    saved = [attn.processor for attn in layers]
    for attn in layers:
        attn.set_processor(_DenseWithDtkGlue())
    state["restore"] = lambda: [attn.set_processor(p) for attn, p in zip(layers, saved)]
    inner = _forward(state)
    if not state["device"].startswith("cuda"):
        return _first_call(state, inner, {})
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return inner()
    return _first_call(state, fn, {})


def _make_prep_dtk(kwargs):
    def prep(state):
        model, shape = _unadapted(state), state["shape"]
        if shape.model == "flux":
            from dtk.adapters.flux import apply_local_attention
            apply_local_attention(model, **kwargs)
        else:
            from dtk.adapters.wan import apply_inward_window
            apply_inward_window(model, **kwargs)
        try:
            return _first_call(state, _forward(state), {})
        except NotImplementedError as e:
            if "Could not run" in str(e):
                raise Skip(f"a dtk op has no {state['device']} kernel in this build")
            raise
    return prep


def check(state, out) -> CheckResult:
    against = "shape and finiteness only (adapter correctness: tests/adapters)"
    expect = state["inputs"]["hidden_states"].shape
    if tuple(out.shape) != tuple(expect):
        return CheckResult(False, float("inf"), 0.0, 0, against + f"; shape {tuple(out.shape)} != {tuple(expect)}")
    if not torch.isfinite(out).all():
        return CheckResult(False, float("nan"), 0.0, 0, against + "; non-finite values in the output")
    return CheckResult(True, 0.0, 0.0, 0, against)


def make_case(shape: E2EShape, gpu: bool) -> Case:
    params = dict(model=shape.model, grid=list(shape.grid), text=shape.text,
                  layers=shape.config.get("num_layers", 0) + shape.config.get("num_single_layers", 0),
                  heads=shape.config["num_attention_heads"], head_dim=shape.config["attention_head_dim"],
                  adapter=dict(shape.adapter))
    label = "local" if shape.model == "flux" else "window"
    impls = [Impl("diffusers-dense", _prep_dense, kind="anchor", slow=shape.slow, cost_hint_s=60.0 if gpu else 0.0,
                  note="unadapted model (diffusers' default attention backend)")]
    if gpu:
        impls.append(Impl("diffusers-dense-cudnn", _prep_dense_cudnn, kind="anchor", slow=shape.slow,
                          cost_hint_s=60.0, note="unadapted model, SDPA held to cuDNN"))
    if shape.model == "flux":
        impls.append(Impl("dense-cudnn-dtk-glue" if gpu else "dense-dtk-glue", _prep_dense_dtk_glue, kind="anchor",
                          slow=shape.slow, cost_hint_s=60.0 if gpu else 0.0,
                          note="dense SDPA with the adapter's glue (QK-norm + RoPE fused by dtk.rms_norm_rope)"))
    impls.append(Impl(f"dtk-{label}", _make_prep_dtk(shape.adapter), kind="dtk", slow=shape.slow))
    for suffix, kw in shape.variants:
        impls.append(Impl(f"dtk-{label}-{suffix}", _make_prep_dtk(kw), kind="dtk", slow=shape.slow))
    return Case(op=OP, shape=shape.name, params=params, setup=make_setup(shape), impls=impls, check=check,
                work=lambda: (0.0, 0.0), dtype="bfloat16" if gpu else "float32", gpu=gpu, note=shape.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
