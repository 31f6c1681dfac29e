"""Window attention training step (`dtk.window_attention` forward + backward): what CLEAR-style
fine-tuning pays per attention call.

Implementations, all run in one process on the same tensors, each timed as forward + backward of
sum(out * g) (the gradients of q, k, v):
  dtk          the op's autograd (CPU: C++ kernels; CUDA: the Triton forward, dq and dk/dv walks);
               checked: every gradient against float64 autograd through the dense reference on
               small cases, dq on the check rows otherwise (a row's dq needs only its own keys).
  sdpa-<be>    dense SDPA forward + backward (cuDNN, flash): the cost of ignoring locality.
  flex         FlexAttention forward + backward with the same block mask (GPU only).

FLOPs are the mask's: forward 4 * B * H * D * pairs, backward 2.5 x that (five GEMMs of the pairs
instead of two), so TFLOP/s are effective and comparable across rows.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from dtk.ops.window.reference import masked_attention, window_mask
from dtk.ops.window.spec import pair_count

from ..registry import Case, CheckResult, Impl, Prepared, Skip, check_gradients, first_call, probe, register
from .window import (CPU_SHAPES, GPU_SHAPES, WindowShape, _BACKEND, _dtk_op, _flex_fn, check_rows_for,
                     flex_mask_mod, mask_rows)

OP = "window-bwd"
FULL_CHECK_UP_TO = 2048          # sequences up to this length: every gradient checked in full
CPU_SET = [s for s in CPU_SHAPES if "tile" in s.name or "circle" in s.name]
GPU_SET = [s for s in GPU_SHAPES if s.name.startswith(("flux1024", "na2d-256-w64-tile"))]


def _leaves(state):
    """Fresh leaves (B, S, H, D) views of the case's SDPA-layout tensors, and the head-major ones."""
    hs = [state[n].detach().requires_grad_() for n in ("qh", "kh", "vh")]
    return [h.transpose(1, 2) for h in hs], hs


def _train_step(forward, leaves, g):
    out = forward()
    return torch.autograd.grad(out, leaves, g)


def _prep_dtk(state):
    op = _dtk_op()
    sh: WindowShape = state["shape"]
    (q, k, v), hs = _leaves(state)
    kw = dict(sh.op_kwargs(), scale=state["scale"])
    g = state["g"]
    fn = lambda: tuple(x.transpose(1, 2) for x in _train_step(  # noqa: E731   grads in (B, S, H, D)
        lambda: op(q, k, v, sh.grid, sh.window, **kw), hs, g))
    return Prepared(fn, first_call(fn, state["device"], "window_attention forward + backward"))


def _sdpa_prep(backend):
    def prep(state):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = getattr(SDPBackend, _BACKEND[backend])
        _, (qh, kh, vh) = _leaves(state)
        g, scale = state["g"], state["scale"]

        def fwd():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2)
        fn = lambda: _train_step(fwd, (qh, kh, vh), g)  # noqa: E731
        probe(fn, state["device"], f"{backend} backend")
        return Prepared(fn)
    return prep


def _prep_flex(state):
    if not state["device"].startswith("cuda"):
        raise Skip("GPU only")
    from torch.nn.attention.flex_attention import create_block_mask
    spec = state["spec"]
    bm = create_block_mask(flex_mask_mod(spec, state["device"]), None, None, spec.seq_len, spec.seq_len,
                           device=state["device"])
    flex = _flex_fn()
    _, (qh, kh, vh) = _leaves(state)
    g, scale = state["g"], state["scale"]
    fn = lambda: _train_step(lambda: flex(qh, kh, vh, block_mask=bm, scale=scale).transpose(1, 2),  # noqa: E731
                             (qh, kh, vh), g)
    return Prepared(fn, first_call(fn, state["device"], "flex forward + backward"))


def _reference_grads(state, dtype):
    """Gradients of sum(out * g) through the dense reference in `dtype`: all of (dq, dk, dv) on
    small cases, else dq on the check rows only."""
    spec, rows, g = state["spec"], state["rows"], state["g"]
    k, v = (state[n].detach().to(dtype) for n in ("k", "v"))
    if spec.seq_len <= FULL_CHECK_UP_TO:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (state["q"], k, v))
        out, _ = masked_attention(q, k, v, window_mask(spec, 0, q.device), state["scale"])
        return torch.autograd.grad((out * g.to(dtype)).sum(), (q, k, v))
    # dq of the check rows, head chunk by head chunk (scores of at most 2^27 elements at a time;
    # the window cases have H_kv = H, so q and k/v heads chunk alike)
    mask = mask_rows(spec, rows, k.device)
    B, S, H, _ = state["q"].shape
    hc = max(1, min(H, (1 << 27) // max(1, B * rows.numel() * S)))
    dq = []
    for h0 in range(0, H, hc):
        hs = slice(h0, min(H, h0 + hc))
        q = state["q"][:, :, hs].detach().index_select(1, rows).to(dtype).requires_grad_()
        out, _ = masked_attention(q, k[:, :, hs], v[:, :, hs], mask, state["scale"])
        dq.append(torch.autograd.grad((out * g[:, :, hs].index_select(1, rows).to(dtype)).sum(), q)[0])
    return torch.cat(dq, 2),


def check(state, grads) -> CheckResult:
    spec, rows = state["spec"], state["rows"]
    full = spec.seq_len <= FULL_CHECK_UP_TO
    return check_gradients(state, grads, _reference_grads, full, "float64 autograd through the dense reference: " + (
        "dq, dk, dv" if full else f"dq on {rows.numel()}/{spec.seq_len} query rows"))


def make_case(shape: WindowShape, gpu: bool) -> Case:
    spec = shape.spec()

    def setup(device, dtype):
        S = spec.seq_len
        gen = dict(device=device, dtype=dtype)
        qh, kh, vh = (torch.randn(shape.B, shape.H, S, shape.D, **gen) for _ in range(3))
        return dict(shape=shape, spec=spec, device=device, dtype=dtype, qh=qh, kh=kh, vh=vh,
                    q=qh.transpose(1, 2), k=kh.transpose(1, 2), v=vh.transpose(1, 2),
                    g=torch.randn(shape.B, S, shape.H, shape.D, **gen),
                    scale=1.0 / math.sqrt(shape.D), rows=check_rows_for(spec, device))

    def work():
        flops = 3.5 * 4.0 * shape.B * shape.H * shape.D * pair_count(spec)
        nbytes = 9.0 * shape.B * spec.seq_len * shape.H * shape.D * (2 if gpu else 4)  # q k v out dout read, 3 grads + out written
        return flops, nbytes

    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True)]
    impls += [Impl(f"sdpa-{be}", _sdpa_prep(be), note="dense, no mask") for be in ("cudnn", "flash")]
    if gpu:
        impls.append(Impl("flex", _prep_flex, check=True, devices=("cuda",), cost_hint_s=20.0))
    params = {k: v for k, v in dataclasses.asdict(shape).items() if k not in ("name", "note") and v is not None}
    params["seq_len"] = spec.seq_len
    return Case(op=OP, shape=shape.name, params=params, setup=setup, impls=impls, check=check, work=work,
                dtype="bfloat16" if gpu else "float32", gpu=gpu, note="forward + backward; " + shape.note)


for _s in CPU_SET:
    register(make_case(_s, gpu=False))
for _s in GPU_SET:
    register(make_case(_s, gpu=True))
