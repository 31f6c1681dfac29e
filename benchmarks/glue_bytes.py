"""Memory traffic of FLUX's (and Wan's) attention glue, counted op by op on meta tensors (no GPU, no data):
the bytes every eager aten op reads and writes for the QK-norm + RoPE of one (B, S, H, D) tensor,
as diffusers runs it (torch.nn.RMSNorm, then apply_rotary_emb), against dtk.rms_norm_rope's one
read of x and the tables and one write. These passes are bandwidth-bound, so bytes / the card's
copy bandwidth bounds their time; a traffic count, not a timing (the benchmark times them:
`python -m benchmarks --gpu --op rotary`).

On meta tensors torch.nn.RMSNorm decomposes into its ATen ops; a CUDA build may run it as one
fused kernel (then its part is ~2x the bytes of x), which the `fused norm` line counts.

    python -m benchmarks.glue_bytes                      # FLUX 4096^2: 66,048 tokens x 24 x 128
    python -m benchmarks.glue_bytes --seq 16896          # FLUX 2048^2
    python -m benchmarks.glue_bytes --model wan --seq 171360 --heads 12   # Wan2.1-1.3B 1080p, 81 frames
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class ByteCount(TorchDispatchMode):
    """Sums the bytes of the tensors each non-view aten op reads and writes."""

    def __init__(self):
        super().__init__()
        self.ops = []     # (op name, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        alias = [r.alias_info for r in func._schema.returns]
        if alias and all(a is not None and not a.is_write for a in alias):   # a view: no bytes move
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.__name__, sum(t.numel() * t.element_size() for t in ins + outs)))
        return out

    @property
    def total(self) -> int:
        return sum(b for _, b in self.ops)


def glue_bytes(B=1, S=66048, H=24, D=128, dtype=torch.bfloat16, model="flux") -> dict:
    """Bytes of diffusers' QK-norm + RoPE on one tensor (norm unfused and fused) and of the fused
    op. FLUX: a per-head norm, float32 tables; Wan: the norm over all heads, float64 (1, S, 1, D)
    tables and WanAttnProcessor's rotation (dtk.adapters.wan.wan_rope is the same code)."""
    meta = dict(device="meta")
    x = torch.empty(B, S, 3 * H * D, dtype=dtype, **meta)[..., :H * D]             # a fused-qkv slice
    if model == "flux":
        from diffusers.models.embeddings import apply_rotary_emb
        x = x.unflatten(-1, (H, D))
        norm = torch.nn.RMSNorm(D, eps=1e-6, dtype=dtype, **meta)
        cos, sin = torch.empty(S, D, **meta), torch.empty(S, D, **meta)
        rotate = lambda t: apply_rotary_emb(t, (cos, sin), sequence_dim=1)  # noqa: E731
    elif model == "wan":
        from dtk.adapters.wan import wan_rope
        norm = torch.nn.RMSNorm(H * D, eps=1e-6, dtype=dtype, **meta)
        cos, sin = (torch.empty(1, S, 1, D, dtype=torch.float64, **meta) for _ in range(2))
        rotate = lambda t: wan_rope(t.unflatten(2, (H, D)), cos, sin)  # noqa: E731
    else:
        raise ValueError(f"model must be 'flux' or 'wan', got {model!r}")
    with ByteCount() as n:
        normed = norm(x)
    with ByteCount() as r:
        rotate(normed)
    xb = x.numel() * x.element_size()
    tables = 2 * S * D * 4      # the op's float32 tables
    return dict(x=xb, norm=n.total, norm_fused=2 * xb, rope=r.total, rope_ops=r.ops, norm_ops=n.ops,
                dtk=2 * xb + tables)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=66048)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--model", choices=["flux", "wan"], default="flux")
    args = ap.parse_args(argv)
    try:
        r = glue_bytes(S=args.seq, H=args.heads, D=args.head_dim, model=args.model)
    except ImportError as e:
        raise SystemExit(f"needs diffusers ({e})")
    gb = lambda b: f"{b / 1e9:7.2f} GB"  # noqa: E731
    print(f"{args.model}: one bf16 (1, {args.seq}, {args.heads}, {args.head_dim}) tensor, x = {gb(r['x'])}")
    for name, b in r["norm_ops"]:
        print(f"  norm  {name:14s} {gb(b)}")
    for name, b in r["rope_ops"]:
        print(f"  rope  {name:14s} {gb(b)}")
    print(f"diffusers, norm unfused   {gb(r['norm'] + r['rope'])}")
    print(f"diffusers, fused norm     {gb(r['norm_fused'] + r['rope'])}")
    print(f"dtk.rms_norm_rope         {gb(r['dtk'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
