"""Sparse-token attention (`dtk.multi_kv_attention`, `dtk.segment_attention`): shapes, implementations
and the correctness check. Three workloads (docs/benchmarks.md), a tiny CPU version of each:

  spotedit       FLUX-Kontext editing step: queries = text + the edited ~30% of the image tokens,
                 keys = text + image + condition image from three separate K/V sources.
                 dtk: one call, results scattered into `out` in place (GPU: cuDNN per K/V source +
                 one merge pass that scatters, q rows gathered once; "dtk-triton": the Triton
                 engine, q rows gathered in the kernel).
                 anchor "gather-cat-sdpa-<be>": index_select q + torch.cat of K/V + SDPA + index_copy_.
  ominicontrol2  queries = fresh tokens; keys = fresh K/V + cached condition K/V (two sources).
                 dtk: one call over [fresh, cond] (GPU: cuDNN per source + merge; "dtk-triton": the
                 Triton engine). anchors "cat-sdpa-<be>" (torch.cat + SDPA) and
                 "sdpa-<be>-preconcat" (SDPA on K/V concatenated once at setup: the target is
                 <= 1.05x of it while never concatenating).
  segment        OminiControl branches [text, image, cond1, cond2] with the asymmetric mask (text and
                 image see all, conditions only themselves). dtk: the branch layout as CPU tensors
                 (GPU: cuDNN per query branch and run of visible key branches + merge);
                 "dtk-triton": the Triton engine (layout on the device, one launch). anchors: dense bool-masked SDPA, and a
                 per-query-branch SDPA loop over the allowed key branches.

FLOPs are the useful ones: 4 * B * H * D * (allowed (q, k) pairs), for every row.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from ..registry import Case, CheckResult, Impl, Prepared, Skip, first_call, probe, register

OP = "sparse"
CHECK_ROWS = 256
_BACKEND = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


@dataclass(frozen=True)
class SparseShape:
    name: str
    kind: str                       # spotedit | ominicontrol2 | segment
    H: int
    D: int
    lens: Tuple[int, ...]           # K/V sources (spotedit/omini) or branches (segment)
    n_text: int = 0                 # spotedit: text queries (always computed)
    frac: float = 0.0               # spotedit: fraction of image tokens recomputed
    B: int = 1
    note: str = ""


CPU_SHAPES = [
    SparseShape("spotedit-tiny", "spotedit", 2, 64, (32, 256, 256), n_text=32, frac=0.3),
    SparseShape("ominicontrol2-tiny", "ominicontrol2", 2, 64, (288, 256)),
    SparseShape("segment-omini-tiny", "segment", 2, 64, (32, 256, 256, 256)),
]
GPU_SHAPES = [
    SparseShape("spotedit-flux-kontext", "spotedit", 24, 128, (512, 4096, 4096), n_text=512, frac=0.3,
                note="1,740 queries (512 text + 30% of 4096), 8,704 keys in 3 sources; target <= 0.8x anchor"),
    SparseShape("ominicontrol2-flux", "ominicontrol2", 24, 128, (4608, 4096),
                note="4,608 queries over 4,608 fresh + 4,096 cached condition K/V; target <= 1.05x preconcat"),
    SparseShape("segment-omini-4608+2x4096", "segment", 24, 128, (512, 4096, 4096, 4096),
                note="OminiControl asymmetric mask, 2 conditions"),
]


def _sdpa(backend, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend is None or not device.startswith("cuda"):
        import contextlib
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, _BACKEND[backend])])


def _group_mask(G):
    from dtk.ops.sparse import ominicontrol_group_mask
    return ominicontrol_group_mask(G - 2)


# ---------------------------------------------------------------------------------------------
# setup

def make_setup(sh: SparseShape):
    def setup(device, dtype):
        gen = dict(device=device, dtype=dtype)
        B, H, D = sh.B, sh.H, sh.D
        st = dict(shape=sh, device=device, dtype=dtype, scale=1.0 / math.sqrt(D))
        if sh.kind == "segment":
            S = sum(sh.lens)
            qh, kh, vh = (torch.randn(B, H, S, D, **gen) for _ in range(3))   # SDPA layout
            cu = torch.tensor([0] + list(torch.tensor(sh.lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
            st.update(qh=qh, kh=kh, vh=vh, q=qh.transpose(1, 2), k=kh.transpose(1, 2), v=vh.transpose(1, 2),
                      cu=cu, gm=_group_mask(len(sh.lens)).to(device))
            st["rows"] = torch.unique(torch.cat([torch.randperm(S)[:CHECK_ROWS], torch.tensor([0, S - 1])])).to(device)
            return st
        khs = [torch.randn(B, H, L, D, **gen) for L in sh.lens]
        vhs = [torch.randn(B, H, L, D, **gen) for L in sh.lens]
        st.update(khs=khs, vhs=vhs, ks=[t.transpose(1, 2) for t in khs], vs=[t.transpose(1, 2) for t in vhs])
        if sh.kind == "spotedit":
            S = sh.lens[0] + sh.lens[1]                   # the query-side sequence: text + image
            n_img = round(sh.frac * sh.lens[1])
            img = torch.randperm(sh.lens[1])[:n_img].sort().values + sh.n_text
            rows = torch.cat([torch.arange(sh.n_text), img]).to(device)
            qh = torch.randn(B, H, S, D, **gen)
            outh = torch.randn(B, H, S, D, **gen)            # previous step's values elsewhere
            st.update(qh=qh, q=qh.transpose(1, 2), outh=outh, out=outh.transpose(1, 2),
                      q_rows=rows, q_index=rows.to(torch.int32)[None].expand(B, -1).contiguous())
            sub = torch.randperm(rows.numel())[:CHECK_ROWS].to(device)
            st["rows"] = rows[sub]
        else:
            S = sh.lens[0]
            qh = torch.randn(B, H, S, D, **gen)
            st.update(qh=qh, q=qh.transpose(1, 2), rows=torch.randperm(S)[:CHECK_ROWS].to(device))
        return st
    return setup


# ---------------------------------------------------------------------------------------------
# check: float64 reference on a subset of query rows

def _ref_rows(state, dtype):
    sh: SparseShape = state["shape"]
    rows = state["rows"]
    if sh.kind == "segment":
        q = state["q"].index_select(1, rows).to(dtype)
        k, v = state["k"].to(dtype), state["v"].to(dtype)
        lens = torch.tensor(sh.lens, device=rows.device)
        branch = torch.repeat_interleave(torch.arange(len(sh.lens), device=rows.device), lens)
        mask = state["gm"][branch[rows][:, None], branch[None, :]]
    else:
        q = state["q"].index_select(1, rows).to(dtype)
        k = torch.cat(state["ks"], 1).to(dtype)
        v = torch.cat(state["vs"], 1).to(dtype)
        mask = None
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * state["scale"]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def check(state, out) -> CheckResult:
    if isinstance(out, (tuple, list)):
        out = out[0]
    rows = state["rows"]
    against = f"float64 reference on {rows.numel()} query rows"
    if torch.isnan(out).any():
        return CheckResult(False, float("nan"), 0.0, rows.numel(), against + "; NaN in output")
    if "_ref64" not in state:
        state["_ref64"] = _ref_rows(state, torch.float64)
        lowp = state["q"].dtype
        state["_base"] = 0.0 if lowp == torch.float64 else (_ref_rows(state, lowp).double() - state["_ref64"]).abs().max().item()
    got = out.index_select(1, rows).double()
    if got.shape != state["_ref64"].shape:
        return CheckResult(False, float("inf"), 0.0, rows.numel(), against + f"; shape {tuple(out.shape)}")
    err = (got - state["_ref64"]).abs().nan_to_num(nan=float("inf")).max().item()
    ok = err <= 2 * state["_base"] + (1e-5 if state["q"].dtype in (torch.float32, torch.float64) else 1e-3)
    if ok and state["shape"].kind == "spotedit" and "_untouched" in state:
        ok = bool(state["_untouched"](out))
        if not ok:
            against += "; rows outside q_index changed"
    tol = 2 * state["_base"] + (1e-5 if state["q"].dtype in (torch.float32, torch.float64) else 1e-3)
    return CheckResult(ok, err, tol, rows.numel(), against)


# ---------------------------------------------------------------------------------------------
# implementations

def _dtk():
    try:
        import dtk
    except Exception as e:  # pragma: no cover
        raise Skip(f"import dtk failed: {e!r}"[:200])
    if not hasattr(dtk, "multi_kv_attention"):
        raise Skip("dtk.multi_kv_attention not available in this build")
    return dtk


def _prep_dtk(state):
    dtk = _dtk()
    sh: SparseShape = state["shape"]
    if sh.kind == "spotedit":
        q, ks, vs, qi, out = state["q"], state["ks"], state["vs"], state["q_index"], state["out"]
        before = out.clone()
        sel = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        sel[state["q_rows"]] = True
        state["_untouched"] = lambda o: torch.equal(o[:, ~sel], before[:, ~sel])

        def fn():
            return dtk.multi_kv_attention(q, ks, vs, q_index=qi, out=out, scale=state["scale"])
        return Prepared(fn, first_call(fn, state["device"], "multi_kv_attention_out"))
    if sh.kind == "ominicontrol2":
        q, ks, vs = state["q"], state["ks"], state["vs"]

        def fn():
            return dtk.multi_kv_attention(q, ks, vs, scale=state["scale"])
        return Prepared(fn, first_call(fn, state["device"], "multi_kv_attention"))
    # the branch layout as host tensors (as a pipeline builds it from Python ints): GPU calls may
    # then take the cuDNN engine, which reads it without a device sync
    q, k, v, cu, gm = state["q"], state["k"], state["v"], state["cu"].cpu(), state["gm"].cpu()

    def fn():
        return dtk.segment_attention(q, k, v, cu, gm, scale=state["scale"])
    return Prepared(fn, first_call(fn, state["device"], "segment_attention"))


def _prep_dtk_triton(state):
    """The Triton engine (engine="triton"), beside the op's automatic choice (cuDNN where it
    serves the call on a GPU)."""
    dtk = _dtk()
    if state["shape"].kind == "segment":
        q, k, v, cu, gm, scale = (state[n] for n in ("q", "k", "v", "cu", "gm", "scale"))
        fn = lambda: dtk.segment_attention(q, k, v, cu, gm, scale=scale, engine="triton")  # noqa: E731
        return Prepared(fn, first_call(fn, state["device"], "segment_attention (Triton engine)"))
    q, ks, vs, scale = state["q"], state["ks"], state["vs"], state["scale"]
    if state["shape"].kind == "spotedit":
        qi, out = state["q_index"], state["out"]
        fn = lambda: dtk.multi_kv_attention(q, ks, vs, q_index=qi, out=out, scale=scale, engine="triton")  # noqa: E731
    else:
        fn = lambda: dtk.multi_kv_attention(q, ks, vs, scale=scale, engine="triton")  # noqa: E731
    return Prepared(fn, first_call(fn, state["device"], "multi_kv_attention (Triton engine)"))


def _prep_spotedit_anchor(backend):
    def prep(state):
        qh, khs, vhs, rows, outh = state["qh"], state["khs"], state["vhs"], state["q_rows"], state["outh"].clone()

        def fn():
            with _sdpa(backend, state["device"]):
                o = F.scaled_dot_product_attention(qh.index_select(2, rows), torch.cat(khs, 2), torch.cat(vhs, 2),
                                                   scale=state["scale"])
            outh.index_copy_(2, rows, o)
            return outh.transpose(1, 2)
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _prep_omini_anchor(backend, preconcat):
    def prep(state):
        qh, khs, vhs = state["qh"], state["khs"], state["vhs"]
        kc, vc = (torch.cat(khs, 2), torch.cat(vhs, 2)) if preconcat else (None, None)

        def fn():
            with _sdpa(backend, state["device"]):
                k = kc if preconcat else torch.cat(khs, 2)
                v = vc if preconcat else torch.cat(vhs, 2)
                return F.scaled_dot_product_attention(qh, k, v, scale=state["scale"]).transpose(1, 2)
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _prep_segment_dense(backend):
    def prep(state):
        sh = state["shape"]
        lens = torch.tensor(sh.lens, device=state["device"])
        branch = torch.repeat_interleave(torch.arange(len(sh.lens), device=state["device"]), lens)
        mask = state["gm"][branch[:, None], branch[None, :]]
        qh, kh, vh = state["qh"], state["kh"], state["vh"]

        def fn():
            with _sdpa(backend, state["device"]):
                return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=state["scale"]).transpose(1, 2)
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def _prep_segment_loop(backend):
    def prep(state):
        sh = state["shape"]
        cu = [0] + torch.tensor(sh.lens).cumsum(0).tolist()
        gm = state["gm"].cpu()
        qh, kh, vh = state["qh"], state["kh"], state["vh"]
        out = torch.empty_like(qh)
        G = len(sh.lens)
        plan = []
        for a in range(G):
            allowed = [b for b in range(G) if gm[a, b] and cu[b + 1] > cu[b]]
            plan.append((a, allowed))

        def fn():
            with _sdpa(backend, state["device"]):
                for a, allowed in plan:
                    qa = qh[:, :, cu[a]:cu[a + 1]]
                    if qa.shape[2] == 0:
                        continue
                    if not allowed:
                        out[:, :, cu[a]:cu[a + 1]] = 0
                        continue
                    # contiguous runs of allowed branches are slices, else one torch.cat
                    if allowed == list(range(allowed[0], allowed[-1] + 1)):
                        k = kh[:, :, cu[allowed[0]]:cu[allowed[-1] + 1]]
                        v = vh[:, :, cu[allowed[0]]:cu[allowed[-1] + 1]]
                    else:
                        k = torch.cat([kh[:, :, cu[b]:cu[b + 1]] for b in allowed], 2)
                        v = torch.cat([vh[:, :, cu[b]:cu[b + 1]] for b in allowed], 2)
                    out[:, :, cu[a]:cu[a + 1]] = F.scaled_dot_product_attention(qa, k, v, scale=state["scale"])
            return out.transpose(1, 2)
        probe(fn, state["device"], backend or "sdpa")
        return Prepared(fn)
    return prep


def make_impls(sh: SparseShape, gpu: bool):
    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True)]
    impls.append(Impl("dtk-triton", _prep_dtk_triton, kind="dtk", check=True, devices=("cuda",),
                      note="the Triton engine (engine=\"triton\")"))
    backends = ("cudnn", "flash", "efficient") if gpu else (None,)
    for be in backends:
        tag = be or "default"
        if sh.kind == "spotedit":
            impls.append(Impl(f"gather-cat-sdpa-{tag}", _prep_spotedit_anchor(be), check=True,
                              note="index_select q + cat K/V + SDPA + index_copy_"))
        elif sh.kind == "ominicontrol2":
            impls.append(Impl(f"cat-sdpa-{tag}", _prep_omini_anchor(be, False), check=True, note="torch.cat + SDPA"))
            impls.append(Impl(f"sdpa-{tag}-preconcat", _prep_omini_anchor(be, True), check=True,
                              note="SDPA on K/V concatenated at setup"))
        else:
            impls.append(Impl(f"branch-loop-sdpa-{tag}", _prep_segment_loop(be), check=True,
                              note="one SDPA per query branch"))
    if sh.kind == "segment":
        for be in (("efficient", "cudnn", "math") if gpu else (None,)):
            impls.append(Impl(f"masked-sdpa-{be or 'default'}", _prep_segment_dense(be), check=True,
                              note="dense bool mask"))
    return impls


def _pairs(sh: SparseShape) -> float:
    if sh.kind == "spotedit":
        return (sh.n_text + round(sh.frac * sh.lens[1])) * sum(sh.lens)
    if sh.kind == "ominicontrol2":
        return sh.lens[0] * sum(sh.lens)
    gm = _group_mask(len(sh.lens))
    return float(sum(sh.lens[a] * sh.lens[b] for a in range(len(sh.lens)) for b in range(len(sh.lens)) if gm[a, b]))


def make_work(sh: SparseShape, elem_bytes: int):
    def work():
        flops = 4.0 * sh.B * sh.H * sh.D * _pairs(sh)
        if sh.kind == "spotedit":
            nq = sh.n_text + round(sh.frac * sh.lens[1])
            toks = 2 * nq + 2 * sum(sh.lens)
        elif sh.kind == "ominicontrol2":
            toks = 2 * sh.lens[0] + 2 * sum(sh.lens)
        else:
            toks = 4 * sum(sh.lens)
        return flops, float(sh.B * sh.H * sh.D * elem_bytes * toks)
    return work


def make_case(sh: SparseShape, gpu: bool) -> Case:
    params = {k: v for k, v in asdict(sh).items() if k not in ("name", "note")}
    return Case(op=OP, shape=sh.name, params=params, setup=make_setup(sh), impls=make_impls(sh, gpu), check=check,
                work=make_work(sh, 2 if gpu else 4), dtype="bfloat16" if gpu else "float32", gpu=gpu, note=sh.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
