"""The C++ CPU engine of dtk::window_attention against the float64 reference (random sweeps),
mask semantics by key counts, argument validation and opcheck."""
import math
import random

import pytest
import torch

import dtk  # noqa: F401
from dtk.ops.window.reference import window_attention_reference
from dtk.ops.window.spec import make_spec, pair_count
from ...helpers import assert_matches_reference, bshd

OP = torch.ops.dtk.window_attention


def call(q, k, v, grid, window=None, radius=None, border="inward", num_prefix=0, tile=None, scale=None,
         extra_k=None, extra_v=None):
    return OP(q, k, v, list(grid), None if window is None else list(window), radius, border, num_prefix,
              None if tile is None else list(tile), scale, extra_k, extra_v)


def inputs(B, S, H, Hkv, D, E, dtype, transposed=False):
    q = bshd(B, S, H, D, dtype, transposed=transposed)
    k = bshd(B, S, Hkv, D, dtype, transposed=transposed)
    v = bshd(B, S, Hkv, D, dtype, transposed=transposed)
    ek = ev = None
    if E:
        ek, ev = bshd(B, E, Hkv, D, dtype), bshd(B, E, Hkv, D, dtype)
    return q, k, v, ek, ev


def check(geo, *, P=0, E=0, H=2, Hkv=1, D=16, B=1, dtype=torch.float64, transposed=False, scale=None):
    grid = geo["grid"]
    S = P + math.prod(grid)
    q, k, v, ek, ev = inputs(B, S, H, Hkv, D, E, dtype, transposed)
    kw = dict(window=geo.get("window"), radius=geo.get("radius"), border=geo.get("border", "inward"),
              num_prefix=P, tile=geo.get("tile"), scale=scale)
    out, lse = call(q, k, v, grid, extra_k=ek, extra_v=ev, **kw)
    assert out.shape == (B, S, H, D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64, lse64 = window_attention_reference(d(q), d(k), d(v), grid, extra_k=d(ek), extra_v=d(ev), **kw)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), "rows without keys differ"
    fin = torch.isfinite(lse64)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref64, atol=1e-10, rtol=0)
    else:
        ref_lp, _ = window_attention_reference(q, k, v, grid, extra_k=ek, extra_v=ev, **kw)
        assert_matches_reference(out, ref64, ref_lp)
    torch.testing.assert_close(lse[fin].double(), lse64[fin].double(), atol=1e-5, rtol=1e-6)
    assert (out[~fin.transpose(1, 2)] == 0).all() if (~fin).any() else True


GEOMETRIES = [
    # 1D
    dict(grid=(7,), window=(3,)),
    dict(grid=(13,), window=(4,), border="clip"),
    dict(grid=(5,), window=(9,)),                      # window larger than the grid
    dict(grid=(5,), window=(9,), border="clip"),
    dict(grid=(11,), window=(-1,), border="clip"),
    dict(grid=(17,), radius=3),
    dict(grid=(13,), window=(5,), tile=(4,)),          # partial last tile
    # 2D
    dict(grid=(5, 7), window=(3, 4)),
    dict(grid=(6, 5), window=(2, -1), border="clip"),
    dict(grid=(3, 3), window=(5, 5)),                  # grid smaller than the window
    dict(grid=(3, 2), window=(4, 6), border="clip"),
    dict(grid=(11, 13), radius=3, border="clip"),
    dict(grid=(7, 7), radius=5),
    dict(grid=(9, 8), radius=4, tile=(4, 3)),
    dict(grid=(5, 7), window=(3, 2), border="clip", tile=(2, 3)),
    dict(grid=(1, 1), radius=4),                       # inward circle with no key at all
    dict(grid=(2, 3), radius=5),
    # 3D
    dict(grid=(3, 5, 4), window=(-1, 3, 2)),
    dict(grid=(2, 3, 5), window=(3, 2, 3), border="clip"),
    dict(grid=(3, 4, 5), radius=2),
    dict(grid=(4, 5, 3), radius=3, border="clip"),
    dict(grid=(5, 3, 7), window=(2, 2, 4), tile=(2, 2, 3)),
    dict(grid=(3, 5, 4), radius=2, tile=(2, 3, 3), border="clip"),
    dict(grid=(1, 1, 1), radius=3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_geometries(geo, dtype):
    check(geo, dtype=dtype, P=0, E=0, H=2, Hkv=2)
    check(geo, dtype=dtype, P=3, E=2, H=4, Hkv=2, transposed=True)


def _random_geometry(rng):
    ndim = rng.randint(1, 3)
    grid = tuple(rng.choice([1, 2, 3, 5, 7, 11]) if ndim > 1 else rng.randint(1, 29) for _ in range(ndim))
    geo = dict(grid=grid, border=rng.choice(["inward", "clip"]))
    if rng.random() < 0.5:
        geo["window"] = tuple(rng.choice([-1, 1, 2, 3, 4, 5, 8]) for _ in range(ndim))
    else:
        geo["radius"] = rng.randint(1, 5)
    if rng.random() < 0.4:
        geo["tile"] = tuple(rng.randint(1, 4) for _ in range(ndim))
    return geo


@pytest.mark.parametrize("i", range(30))
def test_random_sweep(i):
    rng = random.Random(torch.initial_seed() + i)
    geo = _random_geometry(rng)
    H, Hkv = rng.choice([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)])
    check(geo, P=rng.choice([0, 1, 4]), E=rng.choice([0, 0, 3]), H=H, Hkv=Hkv, D=rng.choice([1, 3, 8, 16]),
          B=rng.choice([1, 2]), dtype=rng.choice([torch.float64, torch.float32]), transposed=rng.random() < 0.5,
          scale=rng.choice([None, 0.3, 2.0]))


@pytest.mark.parametrize("D", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_dims(D, dtype):
    check(dict(grid=(6, 7), window=(3, 5), tile=(4, 4)), P=2, E=2, H=4, Hkv=2, D=D, B=2, dtype=dtype,
          transposed=True)
    check(dict(grid=(9, 8), radius=3, border="clip"), P=1, H=2, Hkv=1, D=D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check(dict(grid=(5, 6), window=(3, 3)), P=2, E=2, H=4, Hkv=2, D=64, dtype=dtype)
    check(dict(grid=(3, 4, 5), radius=2, tile=(2, 2, 2)), P=1, H=2, D=40, dtype=dtype, transposed=True)


# Key sets larger than one chunk (the engine scores at most 512 keys of a query block at a time):
# window unions split over several chunks, chunk borders inside grid rows and inside circle rows,
# and dense key ranges (prefix keys, all S keys of the prefix queries, extra keys) over a chunk.
MULTI_CHUNK = [
    (dict(grid=(700,), window=(601,), border="clip"), 0, 0),          # 1D: one grid row over chunks
    (dict(grid=(12, 200), window=(3, 199)), 0, 2),
    (dict(grid=(5, 12, 13), window=(-1, 9, -1), tile=(2, 5, 4)), 3, 0),  # whole axes, tile order
    (dict(grid=(31, 29), radius=13, border="clip"), 1, 0),
    (dict(grid=(9, 11), radius=7, tile=(4, 4)), 600, 0),              # prefix longer than a chunk
    (dict(grid=(6, 7), window=(3, 3)), 2, 530),                       # more extra keys than a chunk
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geo,P,E", MULTI_CHUNK, ids=[str(i) for i in range(len(MULTI_CHUNK))])
def test_multi_chunk(geo, P, E, dtype):
    check(geo, P=P, E=E, H=4, Hkv=2, D=16, dtype=dtype, transposed=True)


def test_sdpa_layout_no_copy_and_strides():
    # Non-contiguous views along B, S and H (not just transposes) are read in place.
    B, S, H, D = 2, 3 + 20, 4, 16
    big = torch.randn(B, 2 * S, H + 2, D + 5, dtype=torch.float64)
    q = big[:, ::2, 1:H + 1, :D]
    k = big[:, 1::2, :2, 2:D + 2]
    v = torch.randn(B, 2, S, D, dtype=torch.float64).transpose(1, 2)
    out, lse = call(q, k, v, (4, 5), window=(3, 3), num_prefix=3)
    ref, rlse = window_attention_reference(q, k, v, (4, 5), (3, 3), num_prefix=3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, rlse)


@pytest.mark.parametrize("r,count", [(8, 193), (16, 793), (32, 3205)])
@pytest.mark.parametrize("border", ["clip", "inward"])
def test_interior_circle_key_counts(r, count, border):
    # Zero queries: every allowed key scores 0, so exp(lse) counts the keys of each query.
    n = 2 * r + 1
    q = torch.zeros(1, n * n, 1, 1, dtype=torch.float64)
    k = torch.randn(1, n * n, 1, 1, dtype=torch.float64)
    _, lse = call(q, k, k, (n, n), radius=r, border=border)
    counts = lse.double().exp().round().long().view(n, n)
    assert counts[r, r].item() == count
    spec = make_spec((n, n), radius=r, border=border)
    assert counts.sum().item() == pair_count(spec)


@pytest.mark.parametrize("geo", GEOMETRIES[::3], ids=str)
def test_pair_count(geo):
    # Total allowed (query, key) pairs, prefix and extra keys included, against spec.pair_count.
    P, E = 2, 3
    spec = make_spec(geo["grid"], geo.get("window"), geo.get("radius"), geo.get("border", "inward"), P, geo.get("tile"))
    S = spec.seq_len
    z = torch.zeros(1, S, 1, 2, dtype=torch.float64)
    ek = torch.zeros(1, E, 1, 2, dtype=torch.float64)
    _, lse = call(z, z, z, geo["grid"], geo.get("window"), geo.get("radius"), geo.get("border", "inward"), P,
                  geo.get("tile"), None, ek, ek)
    assert lse.double().exp().sum().round().long().item() == pair_count(spec, E)


def test_one_hot_values_pick_window():
    # v = one-hot of the key index and q = 0: out[i, j] = 1/count_i on the allowed keys j.
    grid, window = (4, 6), (3, 3)
    S = 24
    q = torch.zeros(1, S, 1, S, dtype=torch.float64)
    k = torch.randn(1, S, 1, S, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).view(1, S, 1, S)
    out, _ = call(q, k, v, grid, window=window, border="clip")
    from dtk.ops.window.reference import window_mask
    mask = window_mask(make_spec(grid, window, border="clip"))
    assert torch.equal(out[0, :, 0] > 0, mask)


# ---------------------------------------------------------------------------------------------
# Validation: every bad argument raises with its name in the message.

def _base():
    q = torch.randn(1, 2 + 12, 4, 8)
    k = torch.randn(1, 14, 2, 8)
    return dict(q=q, k=k, v=torch.randn_like(k), grid=[3, 4], window=[3, 3], radius=None, border="inward",
                num_prefix=2, tile=None, scale=None, extra_k=None, extra_v=None)


def _run(**changes):
    a = _base()
    a.update(changes)
    return OP(a["q"], a["k"], a["v"], a["grid"], a["window"], a["radius"], a["border"], a["num_prefix"],
              a["tile"], a["scale"], a["extra_k"], a["extra_v"])


BAD = [
    (dict(grid=[]), "grid"),
    (dict(grid=[1, 1, 3, 4], window=[1, 1, 3, 3]), "grid"),
    (dict(grid=[0, 4]), "grid"),
    (dict(grid=[3, 5]), "grid"),
    (dict(grid=[2, 5]), "S"),
    (dict(window=[3]), "window"),
    (dict(window=[0, 3]), "window"),
    (dict(window=[3, -2]), "window"),
    (dict(window=None, radius=0), "radius"),
    (dict(window=None, radius=-3), "radius"),
    (dict(radius=2), "radius"),
    (dict(window=None), "window"),
    (dict(border="outward"), "border"),
    (dict(num_prefix=-1), "num_prefix"),
    (dict(num_prefix=20), "num_prefix"),
    (dict(tile=[2]), "tile"),
    (dict(tile=[2, 0]), "tile"),
    (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(q=torch.randn(14, 4, 8)), "q"),
    (dict(q=torch.randn(1, 14, 4, 16)[..., ::2]), "q"),
    (dict(k=torch.randn(1, 14, 2, 16)[..., ::2]), "k"),
    (dict(v=torch.randn(1, 14, 2, 16)[..., ::2]), "v"),
    (dict(q=torch.randint(0, 3, (1, 14, 4, 8))), "q"),
    (dict(k=torch.randn(1, 14, 2, 8, dtype=torch.float64)), "k"),
    (dict(v=torch.randn(1, 14, 2, 8, dtype=torch.float16)), "v"),
    (dict(k=torch.randn(2, 14, 2, 8)), "batch"),
    (dict(k=torch.randn(1, 13, 2, 8)), "k"),
    (dict(v=torch.randn(1, 13, 2, 8)), "v"),
    (dict(k=torch.randn(1, 14, 3, 8), v=torch.randn(1, 14, 3, 8)), "heads"),
    (dict(v=torch.randn(1, 14, 1, 8)), "v"),
    (dict(k=torch.randn(1, 14, 2, 4)), "head dim"),
    (dict(q=torch.randn(1, 14, 4, 0), k=torch.randn(1, 14, 2, 0), v=torch.randn(1, 14, 2, 0)), "q"),
    (dict(extra_k=torch.randn(1, 3, 2, 8)), "extra_"),
    (dict(extra_v=torch.randn(1, 3, 2, 8)), "extra_"),
    (dict(extra_k=torch.randn(1, 3, 2, 8), extra_v=torch.randn(1, 4, 2, 8)), "extra_v"),
    (dict(extra_k=torch.randn(1, 3, 1, 8), extra_v=torch.randn(1, 3, 1, 8)), "extra_k"),
    (dict(extra_k=torch.randn(1, 3, 2, 4), extra_v=torch.randn(1, 3, 2, 4)), "extra_k"),
    (dict(extra_k=torch.randn(3, 2, 8), extra_v=torch.randn(3, 2, 8)), "extra_k"),
    (dict(extra_k=torch.randn(1, 3, 2, 8, dtype=torch.float64), extra_v=torch.randn(1, 3, 2, 8)), "extra_k"),
]


@pytest.mark.parametrize("changes,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_inputs(changes, name):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as e:
        _run(**changes)
    assert name in str(e.value), str(e.value)


def test_valid_base_runs():
    out, lse = _run()
    assert out.shape == (1, 14, 4, 8) and not out.isnan().any() and not lse.isnan().any()


@pytest.mark.parametrize("case", ["box", "circle_tiled_extra"])
def test_opcheck(case):
    B, H, Hkv, D = 1, 4, 2, 8
    q, k, v, ek, ev = inputs(B, 2 + 20, H, Hkv, D, 3, torch.float32, transposed=True)
    if case == "box":
        args = (q, k, v, [4, 5], [3, 3], None, "inward", 2, None, None, None, None)
    else:
        args = (q, k, v, [4, 5], None, 2, "clip", 2, [2, 3], 0.5, ek, ev)
    torch.library.opcheck(OP, args)
