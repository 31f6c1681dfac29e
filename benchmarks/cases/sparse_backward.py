"""Sparse-token attention training step (forward + backward of `dtk.multi_kv_attention` and
`dtk.segment_attention`): what OminiControl-style fine-tuning pays per attention call.

  ominicontrol2  fresh queries over [fresh K/V, condition K/V] (two sources, never concatenated).
                 dtk: the op's autograd (gradients of q and every K/V source). anchors
                 "cat-sdpa-<be>": torch.cat of K/V + SDPA forward + backward (the cat's backward
                 splits the gradients).
  segment        OminiControl branches with the asymmetric mask. dtk: the op's autograd. anchors
                 "branch-loop-sdpa-<be>": one SDPA per query branch, forward + backward;
                 "masked-sdpa-efficient": dense bool mask.

Each row times forward + backward of sum(out * g). Checked: dq on the check rows against float64
autograd through the dense reference (a row's dq needs only its own keys), every gradient on
small cases. FLOPs: 3.5 x the forward's useful 4 * B * H * D * pairs (the backward's five GEMMs).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..registry import Case, CheckResult, Impl, Prepared, check_gradients, first_call, probe, register
from .sparse import CPU_SHAPES, GPU_SHAPES, SparseShape, _dtk, _pairs, _sdpa, make_setup

OP = "sparse-bwd"
FULL_CHECK_UP_TO = 2048
KINDS = ("ominicontrol2", "segment")


def _leaves(state):
    """Fresh head-major leaves of the case's tensors (shared storage) and their (B, S, H, D) views."""
    if state["shape"].kind == "segment":
        hs = [state[n].detach().requires_grad_() for n in ("qh", "kh", "vh")]
    else:
        hs = [state["qh"].detach().requires_grad_()] + [t.detach().requires_grad_() for t in state["khs"] + state["vhs"]]
    return hs, [h.transpose(1, 2) for h in hs]


def _step(forward, leaves, g):
    return tuple(x.transpose(1, 2) for x in torch.autograd.grad(forward(), leaves, g))


def _prep_dtk(state):
    dtk = _dtk()
    sh: SparseShape = state["shape"]
    hs, ts = _leaves(state)
    g, scale = state["g"], state["scale"]
    if sh.kind == "segment":
        cu, gm = state["cu"].cpu(), state["gm"].cpu()   # host layout, as in the forward family
        fwd = lambda: dtk.segment_attention(*ts, cu, gm, scale=scale)  # noqa: E731
    else:
        n = len(sh.lens)
        fwd = lambda: dtk.multi_kv_attention(ts[0], ts[1:1 + n], ts[1 + n:], scale=scale)  # noqa: E731
    fn = lambda: _step(fwd, hs, g)  # noqa: E731
    return Prepared(fn, first_call(fn, state["device"], f"{sh.kind} forward + backward"))


def _prep_cat_sdpa(backend):
    def prep(state):
        hs, _ = _leaves(state)
        n = len(state["shape"].lens)
        q, khs, vhs = hs[0], hs[1:1 + n], hs[1 + n:]
        g, scale = state["g"], state["scale"]

        def fwd():
            with _sdpa(backend, state["device"]):
                return F.scaled_dot_product_attention(q, torch.cat(khs, 2), torch.cat(vhs, 2),
                                                      scale=scale).transpose(1, 2)
        fn = lambda: _step(fwd, hs, g)  # noqa: E731
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _branch_plan(state):
    sh = state["shape"]
    cu = [0] + torch.tensor(sh.lens).cumsum(0).tolist()
    gm = state["gm"].cpu()
    G = len(sh.lens)
    return cu, [(a, [b for b in range(G) if gm[a, b] and cu[b + 1] > cu[b]]) for a in range(G)]


def _prep_branch_loop(backend):
    def prep(state):
        hs, _ = _leaves(state)
        qh, kh, vh = hs
        cu, plan = _branch_plan(state)
        g, scale = state["g"], state["scale"]

        def fwd():
            outs = []
            with _sdpa(backend, state["device"]):
                for a, allowed in plan:
                    qa = qh[:, :, cu[a]:cu[a + 1]]
                    if not allowed:
                        outs.append(torch.zeros_like(qa))
                        continue
                    k = torch.cat([kh[:, :, cu[b]:cu[b + 1]] for b in allowed], 2)
                    v = torch.cat([vh[:, :, cu[b]:cu[b + 1]] for b in allowed], 2)
                    outs.append(F.scaled_dot_product_attention(qa, k, v, scale=scale))
            return torch.cat(outs, 2).transpose(1, 2)
        fn = lambda: _step(fwd, hs, g)  # noqa: E731
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _prep_masked(backend):
    def prep(state):
        hs, _ = _leaves(state)
        cu, plan = _branch_plan(state)
        S = cu[-1]
        mask = torch.zeros(S, S, dtype=torch.bool, device=state["device"])
        for a, allowed in plan:
            for b in allowed:
                mask[cu[a]:cu[a + 1], cu[b]:cu[b + 1]] = True
        g, scale = state["g"], state["scale"]

        def fwd():
            with _sdpa(backend, state["device"]):
                return F.scaled_dot_product_attention(*hs, attn_mask=mask, scale=scale).transpose(1, 2)
        fn = lambda: _step(fwd, hs, g)  # noqa: E731
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _reference_grads(state, dtype):
    """Autograd through the dense reference in `dtype`: every gradient on small cases, else dq on
    the check rows (those queries as leaves, against every key: memory rows x keys)."""
    from dtk.ops.sparse.reference import _attend, multi_kv_attention_reference, segment_attention_reference
    sh: SparseShape = state["shape"]
    rows, g, scale = state["rows"], state["g"], state["scale"]
    seg = sh.kind == "segment"
    kv = [state["k"], state["v"]] if seg else state["ks"] + state["vs"]
    kv = [t.detach().to(dtype).requires_grad_() for t in kv]
    if sum(sh.lens) <= FULL_CHECK_UP_TO:
        q = state["q"].detach().to(dtype).requires_grad_()
        if seg:
            out, _ = segment_attention_reference(q, *kv, state["cu"].cpu(), state["gm"].cpu(), scale=scale)
        else:
            n = len(sh.lens)
            out, _ = multi_kv_attention_reference(q, kv[:n], kv[n:], scale=scale)
        return torch.autograd.grad((out * g.to(dtype)).sum(), (q, *kv))
    q = state["q"].detach().index_select(1, rows).to(dtype).requires_grad_()
    if seg:
        lens = torch.tensor(sh.lens, device=rows.device)
        branch = torch.repeat_interleave(torch.arange(len(sh.lens), device=rows.device), lens)
        out, _ = _attend(q, *kv, state["gm"][branch[rows][:, None], branch[None, :]], None, scale)
    else:
        n = len(sh.lens)
        out, _ = multi_kv_attention_reference(q, kv[:n], kv[n:], scale=scale)
    return torch.autograd.grad((out * g.index_select(1, rows).to(dtype)).sum(), q)


def check(state, grads) -> CheckResult:
    sh: SparseShape = state["shape"]
    full = sum(sh.lens) <= FULL_CHECK_UP_TO
    return check_gradients(state, grads, _reference_grads, full, "float64 autograd through the dense reference: " + (
        "every gradient" if full else f"dq on {state['rows'].numel()} query rows"))


def make_case(sh: SparseShape, gpu: bool) -> Case:
    base_setup = make_setup(sh)

    def setup(device, dtype):
        st = base_setup(device, dtype)
        st["g"] = torch.randn_like(st["q"])
        return st

    def work():
        toks = (3 * sh.lens[0] + 4 * sum(sh.lens)) if sh.kind == "ominicontrol2" else 9 * sum(sh.lens)
        return 3.5 * 4.0 * sh.B * sh.H * sh.D * _pairs(sh), float(sh.B * sh.H * sh.D * (2 if gpu else 4) * toks)

    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True)]
    for be in (("cudnn", "flash") if gpu else (None,)):
        tag = be or "default"
        if sh.kind == "ominicontrol2":
            impls.append(Impl(f"cat-sdpa-{tag}", _prep_cat_sdpa(be), check=True, note="torch.cat + SDPA, forward + backward"))
        else:
            impls.append(Impl(f"branch-loop-sdpa-{tag}", _prep_branch_loop(be), check=True,
                              note="one SDPA per query branch, forward + backward"))
    if sh.kind == "segment":
        be = "efficient" if gpu else None
        impls.append(Impl(f"masked-sdpa-{be or 'default'}", _prep_masked(be), check=True, note="dense bool mask"))
    params = {k: v for k, v in dataclasses.asdict(sh).items() if k not in ("name", "note")}
    return Case(op=OP, shape=sh.name, params=params, setup=setup, impls=impls, check=check, work=work,
                dtype="bfloat16" if gpu else "float32", gpu=gpu, note="forward + backward; " + sh.note)


for _s in CPU_SHAPES:
    if _s.kind in KINDS:
        register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    if _s.kind in KINDS:
        register(make_case(_s, gpu=True))
