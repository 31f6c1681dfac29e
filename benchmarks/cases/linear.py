"""Linear attention (`dtk.linear_attention`, `dtk.memory_linear_attention`): shapes, implementations,
the correctness check and work counts. These ops are memory-bound: read the GB/s and `% copy`
columns (minimum traffic / time, against the device-copy rate measured in the same run).

Implementations, on the same tensors:
  dtk          the op (CPU tensors: C++ kernels; CUDA tensors: Triton kernels); checked first.
  naive        the same function in plain torch ops, as upstream writes it (LinFusion: elu+1
               features, two einsums, a normalising dot; MEMO: softmax features, decayed state
               and its update); checked.
  sdpa         dense softmax attention (SDPA, torch's backend choice) on the same q, k, v: the cost
               of the attention that linear attention replaces (a different function: not checked).
  sdpa-cudnn   the same with the cuDNN backend (GPU only; the fastest dense backend, docs/benchmarks.md).
  fla-causal   flash-linear-attention's chunk_linear_attn (optional peer, when importable; Triton,
               GPU only) on the same elu+1 features, applied in the timed call. fla has no
               non-causal form, so this is the causal function (more work than the op): it is
               checked against the causal formula (`causal_reference`), not the op's.

LinFusion cases time `linear_attention(q, k, v)` (elu1, normalised, eps 1e-4); MEMO cases time one
clip step with memory: the output against a carried state and the state's update with the clip's
frames (`memory_linear_attention(q, k, v, state)`, which returns both).
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dtk.ops.linear import reference as R
from dtk.ops.memo import reference as MR

from ..registry import Case, CheckResult, Impl, Prepared, Skip, first_call, probe, register

OP = "linear"
EPS = 1e-4
FLA_EPS = 1e-10                  # fla's normalize=True denominator: q_t . sum_{s<=t} k_s + 1e-10
DECAY = 0.9
CHECK_ALL_ROWS_UP_TO = 4096      # outputs with up to this many (batch x seq) rows are checked whole
CHECK_ROWS = 256                 # else these many random sequence rows (plus the first and last)


@dataclass(frozen=True)
class LinearShape:
    name: str
    B: int
    S: int
    H: int
    D: int
    kind: str = "linfusion"      # "linfusion" (dtk.linear_attention) or "memo" (dtk.memory_linear_attention)
    note: str = ""

    @property
    def Dv(self) -> int:
        return self.D


CPU_SHAPES = [
    LinearShape("linfusion-S1024-H4-d64", 1, 1024, 4, 64),
    LinearShape("linfusion-S4096-H2-d40", 2, 4096, 2, 40, note="SD-like head dim"),
    LinearShape("memo-512x16-H2-d40", 512, 16, 2, 40, kind="memo", note="pixels x heads = 1,024, 16 frames"),
]

# --gpu set (bf16): docs/benchmarks.md. SD1.5's UNet pairs head dims with
# resolutions: d40 at the full latent, d80 at 1/2, d160 at 1/4 (8 heads everywhere); B=2 (CFG).
GPU_SHAPES = [
    LinearShape("flux4k-S66048-H24-d128", 1, 66048, 24, 128, note="FLUX-4K-like: 256^2 image + 512 text tokens"),
    LinearShape("sd15-512-64x64-d40", 2, 64 * 64, 8, 40, note="SD1.5 self-attention at 512^2, 64^2 tokens"),
    LinearShape("sd15-512-32x32-d80", 2, 32 * 32, 8, 80, note="SD1.5 at 512^2, 32^2 tokens"),
    LinearShape("sd15-512-16x16-d160", 2, 16 * 16, 8, 160, note="SD1.5 at 512^2, 16^2 tokens"),
    LinearShape("sd15-4096-512x512-d40", 2, 512 * 512, 8, 40, note="SD1.5 self-attention at 4096^2, 512^2 tokens"),
    LinearShape("sd15-4096-256x256-d80", 2, 256 * 256, 8, 80, note="SD1.5 at 4096^2, 256^2 tokens"),
    LinearShape("sd15-4096-128x128-d160", 2, 128 * 128, 8, 160, note="SD1.5 at 4096^2, 128^2 tokens"),
    LinearShape("memo-32768x16-d40", 4096, 16, 8, 40, kind="memo",
                note="MEMO: B x pixels x heads = 32,768 sequences of 16 frames"),
]


# ---------------------------------------------------------------------------------------------
# Work: useful FLOPs and minimum memory traffic of one call

def work_counts(shape: LinearShape, elem_bytes: int):
    B, S, H, D, Dv = shape.B, shape.S, shape.H, shape.D, shape.Dv
    if shape.kind == "memo":
        # state (phi_k v^T) + apply (phi_q KV, phi_q Z) + update (weighted phi_k v^T)
        flops = 2.0 * B * H * S * D * Dv * 3 + 2.0 * B * H * S * D * 3
        # q, k, v read and out written; the fp32 memory (kv, z) read and the new one written
        nbytes = elem_bytes * B * S * H * (2 * D + 2 * Dv) + 4.0 * 2 * B * H * (D * Dv + D)
    else:
        flops = 2.0 * B * H * S * D * Dv * 2 + 2.0 * B * H * S * D * 2
        nbytes = elem_bytes * B * S * H * (2 * D + 2 * Dv)
    return flops, nbytes


def dense_flops(shape: LinearShape) -> float:
    return 4.0 * shape.B * shape.H * shape.S * shape.S * shape.D


# ---------------------------------------------------------------------------------------------
# Naive torch (what the upstream code does, in the inputs' dtype)

def linfusion_naive(q, k, v, eps: float = EPS):
    """LinFusion's generalised linear attention in plain torch ops; q, k, v (B, S, H, D)."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bshd,bshe->bhde", fk, v) / k.shape[1]       # S = (1/N) sum phi(k) v^T
    z = fk.mean(1)                                                  # mean_j phi(k_j)  (B, H, D)
    num = torch.einsum("bshd,bhde->bshe", fq, kv)
    den = torch.einsum("bshd,bhd->bsh", fq, z) + eps
    return num / den[..., None]


def memo_naive(q, k, v, mem_kv, mem_z, decay: float = DECAY):
    """One MEMO clip step in plain torch ops: output against the decayed memory, then the memory
    updated with the clip's frames. Returns (out, new_kv, new_z) (memory in float32, float64 for
    float64 inputs)."""
    D, n = q.shape[-1], k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = torch.softmax(q.to(acc), -1) * D ** -0.5
    fk = torch.softmax(k.to(acc), 1)
    vf = v.to(acc)
    kv = decay * mem_kv + torch.einsum("bshd,bshe->bhde", fk, vf)
    z = decay * mem_z + fk.sum(1)
    num = torch.einsum("bshd,bhde->bshe", fq, kv)
    den = torch.einsum("bshd,bhd->bsh", fq, z).clamp_min(1e-10)
    out = (num / den[..., None]).to(q.dtype)
    w = decay ** torch.arange(n - 1, -1, -1, device=q.device, dtype=acc)
    fkw, vw = fk * w[None, :, None, None], vf * w[None, :, None, None]
    new_kv = decay ** n * mem_kv + torch.einsum("bshd,bshe->bhde", fkw, vw)
    new_z = decay ** n * mem_z + fkw.sum(1)
    return out, new_kv, new_z


# ---------------------------------------------------------------------------------------------
# Reference and check

def check_rows_for(shape: LinearShape, device) -> Optional[torch.Tensor]:
    """Sequence rows whose outputs are checked (None = all)."""
    if shape.kind == "memo" or shape.B * shape.S <= CHECK_ALL_ROWS_UP_TO:
        return None
    rnd = torch.randperm(shape.S)[:CHECK_ROWS]
    return torch.unique(torch.cat([torch.tensor([0, shape.S - 1]), rnd])).to(device)


def reference(state, dtype):
    """The op's outputs from the reference engine computed in `dtype` (float64 = ground truth);
    LinFusion: the state over all keys, applied to the check rows only."""
    q, k, v, rows = state["q"], state["k"].to(dtype), state["v"].to(dtype), state["rows"]
    q = (q if rows is None else q.index_select(1, rows)).to(dtype)
    if state["shape"].kind == "memo":
        mkv, mz = state["mem_kv"].to(dtype), state["mem_z"].to(dtype)
        out = MR.memory_linear_attention_reference(q, k, v, mkv, mz, DECAY)
        new_kv, new_z = MR.memory_update_reference(k, v, mkv, mz, DECAY)
        return [out, new_kv, new_z]
    kv_sum, k_sum, count = R.linear_attention_state_reference(k, v)
    return [R.linear_attention_apply_reference(q, kv_sum, k_sum, count, eps=EPS)]


def causal_linear_attention(fq, fk, v, rows: Optional[torch.Tensor] = None, eps: float = FLA_EPS):
    """Causal normalised linear attention, as fla's chunk_linear_attn(normalize=True, scale=1)
    computes it: out_t = fq_t . sum_{s<=t} fk_s v_s^T / (fq_t . sum_{s<=t} fk_s + eps), in the
    inputs' dtype. fk (B, S, H, D), v (B, S, H, Dv); fq (B, R, H, D): the features of the query
    rows `rows` (ascending; None = all S). The prefix sums advance from one row to the next: O(S)
    work, one (B, H, D, Dv) state in memory."""
    rows = range(fk.shape[1]) if rows is None else rows.tolist()
    kv = z = 0
    start, outs = 0, []
    for i, t in enumerate(rows):
        kv = kv + torch.einsum("bshd,bshe->bhde", fk[:, start:t + 1], v[:, start:t + 1])
        z = z + fk[:, start:t + 1].sum(1)
        start = t + 1
        num = torch.einsum("bhd,bhde->bhe", fq[:, i], kv)
        outs.append(num / (torch.einsum("bhd,bhd->bh", fq[:, i], z) + eps)[..., None])
    return torch.stack(outs, 1)


def causal_reference(state, dtype):
    """The fla peer's function (causal, elu+1 features) on the check rows, computed in `dtype`."""
    q, k, v, rows = state["q"], state["k"].to(dtype), state["v"].to(dtype), state["rows"]
    q = (q if rows is None else q.index_select(1, rows)).to(dtype)
    return [causal_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, rows)]


def _compare(state, out, ref_fn, against: str) -> CheckResult:
    """The correctness rule of docs/testing.md: error vs the float64 reference `ref_fn(state, float64)` <= 2 x (error of
    `ref_fn` computed in the run's dtype) + atol, on every output (MEMO: out, new kv, new z); NaN
    anywhere fails. References are cached in the state, per ref_fn."""
    shape: LinearShape = state["shape"]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    rows = state["rows"]
    n_rows = shape.B * (shape.S if rows is None else rows.numel())
    against = f"{against} on {n_rows}/{shape.B * shape.S} rows"
    key = ("_ref", ref_fn.__name__)
    if key not in state:
        ref64 = ref_fn(state, torch.float64)
        lowp = state["q"].dtype
        bases = [0.0] * len(ref64) if lowp == torch.float64 else \
            [(a.double() - b).abs().max().item() for a, b in zip(ref_fn(state, lowp), ref64)]
        state[key] = ref64, bases
    refs, bases = state[key]
    if len(outs) != len(refs):
        return CheckResult(False, float("inf"), 0.0, n_rows, against + f"; {len(outs)} outputs, expected {len(refs)}")
    atol = 1e-5 if state["q"].dtype in (torch.float32, torch.float64) else 1e-3
    worst = None                      # (err / tol, err, tol) of the output closest to failing
    for i, (o, ref, base) in enumerate(zip(outs, refs, bases)):
        if torch.isnan(o).any():
            return CheckResult(False, float("nan"), 0.0, n_rows, against + "; NaN in output")
        if i == 0 and shape.kind != "memo" and rows is not None:
            o = o.index_select(1, rows)
        if tuple(o.shape) != tuple(ref.shape):
            return CheckResult(False, float("inf"), 0.0, n_rows, against + f"; output {i} shape {tuple(o.shape)}")
        err = (o.double() - ref).abs().max().item()
        tol = 2 * base + atol
        if worst is None or err / tol > worst[0]:
            worst = (err / tol, err, tol)
    return CheckResult(worst[0] <= 1.0, worst[1], worst[2], n_rows, against)


def check(state, out) -> CheckResult:
    return _compare(state, out, reference, "float64 reference")


def check_causal(state, out) -> CheckResult:
    """The fla peer's check: against the causal formula of the same features."""
    return _compare(state, out, causal_reference, "float64 causal reference")


# ---------------------------------------------------------------------------------------------
# Implementations

def _dtk_op(name: str):
    try:
        import dtk
    except Exception as e:  # pragma: no cover
        raise Skip(f"import dtk failed: {e!r}"[:200])
    fn = getattr(dtk, name, None)
    if fn is None:
        raise Skip(f"dtk.{name} not available in this build")
    return fn


def _prep_dtk(state):
    q, k, v = state["q"], state["k"], state["v"]
    if state["shape"].kind == "memo":
        op = _dtk_op("memory_linear_attention")
        mem = (state["mem_kv"], state["mem_z"])

        def fn():
            out, (kv, z) = op(q, k, v, mem, decay=DECAY)
            return out, kv, z
        return Prepared(fn, first_call(fn, state["device"], "memory_linear_attention"))
    op = _dtk_op("linear_attention")
    fn = lambda: op(q, k, v, eps=EPS)  # noqa: E731
    return Prepared(fn, first_call(fn, state["device"], "linear_attention"))


def _prep_naive(state):
    q, k, v = state["q"], state["k"], state["v"]
    if state["shape"].kind == "memo":
        mkv, mz = state["mem_kv"], state["mem_z"]
        return Prepared(lambda: memo_naive(q, k, v, mkv, mz))
    return Prepared(lambda: linfusion_naive(q, k, v))


def _prep_fla(state):
    if importlib.util.find_spec("fla") is None:
        raise Skip("fla not installed")
    if not state["device"].startswith("cuda"):
        raise Skip("GPU only")            # Triton kernels (the interpreter would time nothing useful)
    from fla.ops.linear_attn import chunk_linear_attn
    q, k, v = state["q"], state["k"], state["v"]

    def fn():   # the features are part of the call, as in the dtk row (which fuses them)
        return chunk_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, scale=1.0, normalize=True)[0]
    return Prepared(fn, first_call(fn, state["device"], "fla"))


def _available_bytes(device: str) -> float:
    from .window import _available_bytes as avail
    return avail(device)


def _prep_sdpa(backend: Optional[str]):
    def prep(state):
        qh, kh, vh = (state[n].transpose(1, 2) for n in ("q", "k", "v"))   # (B, H, S, D) views
        if state["device"] == "cpu" or backend == "math":
            B, H, S = qh.shape[:3]
            need = 3.0 * B * H * S * S * 4
            if need > 0.5 * _available_bytes(state["device"]):
                raise Skip(f"memory: dense scores need ~{need / 2 ** 30:.1f} GiB")
        if backend is None:
            fn = lambda: F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)  # noqa: E731
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            be = getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}[backend])

            def fn():
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
        probe(fn, state["device"], f"sdpa{'-' + backend if backend else ''}")
        return Prepared(fn, {"dense_flops": dense_flops(state["shape"])})
    return prep


def _sdpa_cost_hint(shape: LinearShape, gpu: bool, rate_tflops: float, slow_reps: int = 3) -> float:
    return (slow_reps + 2) * dense_flops(shape) / (rate_tflops * 1e12) if gpu else 0.0


def make_impls(shape: LinearShape, gpu: bool):
    impls = [Impl("dtk", _prep_dtk, kind="dtk", check=True),
             Impl("naive", _prep_naive, check=True, note="the formula in plain torch ops")]
    if shape.kind == "memo":
        return impls                  # dense attention over 16 frames is not what MEMO replaces
    # cost hint: fla autotunes its Triton kernels on the first call of each head dim (rough guess)
    impls.append(Impl("fla-causal", _prep_fla, check=True, checker=check_causal, cost_hint_s=30.0 if gpu else 0.0,
                      note="causal (fla has no non-causal form): more work than the op; checked against "
                           "the causal formula"))
    slow = shape.S >= 100_000
    impls.append(Impl("sdpa", _prep_sdpa(None), slow=slow, cost_hint_s=_sdpa_cost_hint(shape, gpu, 300.0),
                      note="dense softmax attention, same q/k/v"))
    if gpu:
        impls.append(Impl("sdpa-cudnn", _prep_sdpa("cudnn"), devices=("cuda",), slow=slow,
                          cost_hint_s=_sdpa_cost_hint(shape, gpu, 550.0), note="dense softmax attention, cuDNN"))
    return impls


# ---------------------------------------------------------------------------------------------
# Cases

def make_setup(shape: LinearShape):
    def setup(device, dtype):
        g = dict(device=device, dtype=dtype)
        B, S, H, D, Dv = shape.B, shape.S, shape.H, shape.D, shape.Dv
        q, k, v = torch.randn(B, S, H, D, **g), torch.randn(B, S, H, D, **g), torch.randn(B, S, H, Dv, **g)
        state = dict(shape=shape, device=device, dtype=dtype, q=q, k=k, v=v, rows=check_rows_for(shape, device))
        if shape.kind == "memo":
            # a carried memory, as after earlier clips: the update of random past frames, in float32
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            kp, vp = torch.randn(B, S, H, D, device=device, dtype=acc), torch.randn(B, S, H, Dv, device=device, dtype=acc)
            mem = MR.memory_update_reference(kp, vp, decay=DECAY)
            state["mem_kv"], state["mem_z"] = mem
        return state
    return setup


def make_case(shape: LinearShape, gpu: bool) -> Case:
    dtype = "bfloat16" if gpu else "float32"
    eb = 2 if gpu else 4
    params = {k: v for k, v in asdict(shape).items() if k not in ("name", "note")}
    params["Dv"] = shape.Dv
    if shape.kind == "memo":
        params.update(decay=DECAY, sequences=shape.B * shape.H)
    else:
        params.update(feature_map="elu1", normalize=True, eps=EPS)
    return Case(op=OP, shape=shape.name, params=params, setup=make_setup(shape), impls=make_impls(shape, gpu),
                check=check, work=lambda: work_counts(shape, eb), dtype=dtype, gpu=gpu, note=shape.note)


for _s in CPU_SHAPES:
    register(make_case(_s, gpu=False))
for _s in GPU_SHAPES:
    register(make_case(_s, gpu=True))
