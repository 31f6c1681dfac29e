"""Random window-attention cases shared by the engine tests."""
import math
import random

import torch

from dtk.ops.window.spec import make_spec


def random_case(rng: random.Random, max_side=9, head_dims=(16, 40, 64), extra_p=0.3, max_tokens=400):
    """A random geometry (grid, window or circle, border, prefix, tile) with at most max_tokens grid tokens."""
    while True:
        case = _random_case(rng, max_side, head_dims, extra_p)
        if math.prod(case["grid"]) <= max_tokens:
            return case


def _random_case(rng, max_side, head_dims, extra_p):
    nd = rng.randint(1, 3)
    grid = tuple(rng.choice([n for n in (1, 2, 3, 5, 7, 11, 13) if n <= max_side]) if rng.random() < 0.5
                 else rng.randint(1, max_side) for _ in range(nd))  # primes and odd sizes often
    border = rng.choice(["inward", "clip"])
    if rng.random() < 0.55:
        window, radius = tuple(rng.choice([-1, 1, 2, 3, 4, 5, 6, 9, 20]) for _ in range(nd)), None
    else:
        window, radius = None, rng.randint(1, 5)
    tile = None if rng.random() < 0.4 else tuple(rng.randint(1, 5) for _ in range(nd))
    return dict(grid=grid, window=window, radius=radius, border=border,
                num_prefix=rng.choice([0, 0, 1, 3, 7]), tile=tile,
                num_extra=rng.choice([0, 0, 2]) if rng.random() < extra_p else 0,
                heads=rng.choice([(2, 2), (4, 1), (4, 2), (3, 3)]), D=rng.choice(head_dims),
                B=rng.choice([1, 2]), transposed=rng.random() < 0.3,
                scale=rng.choice([None, 0.3]))


def make_inputs(case, dtype, device="cpu"):
    spec = make_spec(case["grid"], case["window"], case["radius"], case["border"], case["num_prefix"], case["tile"])
    B, (H, Hkv), D, S, E = case["B"], case["heads"], case["D"], spec.seq_len, case["num_extra"]

    def t(s, h):
        if case["transposed"]:
            return torch.randn(B, h, s, D, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(B, s, h, D, dtype=dtype, device=device)

    q, k, v = t(S, H), t(S, Hkv), t(S, Hkv)
    ek, ev = (t(E, Hkv), t(E, Hkv)) if E else (None, None)
    return q, k, v, ek, ev


def kwargs(case):
    return dict(radius=case["radius"], border=case["border"], num_prefix=case["num_prefix"],
                tile=case["tile"], scale=case["scale"])


def as_dtype(x, dtype):
    return None if x is None else x.to(dtype)
