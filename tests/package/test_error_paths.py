"""One set of argument checks per op: the same bad input gives the same error on every path that
can take it: the CPU kernel (C++, checks from csrc/common/checks.h), the Meta / fake kernel (the
op's Python checks, what torch.compile runs) and, where a GPU is present, the CUDA kernel (the same
Python checks). Each case names the argument the message must name."""
import re

import pytest
import torch

import dtk  # noqa: F401  (registers the ops)

ops = torch.ops.dtk
F32, F64 = torch.float32, torch.float64


def t(dev, *shape, dtype=F32):
    return torch.randn(*shape, device=dev, dtype=dtype) if dtype.is_floating_point else \
        torch.zeros(*shape, device=dev, dtype=dtype)


def window(dev, q=(1, 16, 2, 8), k=(1, 16, 2, 8), kdtype=F32, grid=(16,), border="inward", scale=None,
           extra=None):
    ek = t(dev, 1, 3, 2, 8) if extra else None
    return lambda: ops.window_attention(t(dev, *q), t(dev, *k, dtype=kdtype), t(dev, *k, dtype=kdtype), list(grid),
                                        [3], None, border, 0, None, scale, ek, None)


def linear(dev, q=(1, 16, 2, 8), k=(1, 16, 2, 8), kdtype=F32, feature_map="elu1", eps=1e-4):
    return lambda: ops.linear_attention(t(dev, *q), t(dev, *k, dtype=kdtype), t(dev, *k, dtype=kdtype), feature_map,
                                        True, eps, None, None, None)


def multi_kv(dev, k=(1, 8, 2, 8), kdtype=F32, n_vs=1):
    return lambda: ops.multi_kv_attention(t(dev, 1, 8, 2, 8), [t(dev, *k, dtype=kdtype)],
                                          [t(dev, *k, dtype=kdtype)] * n_vs, [None], None, None)


def segment(dev, cu_dtype=torch.int32, q=(1, 8, 2, 8)):
    cu = torch.tensor([0, 4, 8], device=dev, dtype=cu_dtype)
    return lambda: ops.segment_attention(t(dev, *q), t(dev, 1, 8, 2, 8), t(dev, 1, 8, 2, 8), cu,
                                         torch.ones(2, 2, dtype=torch.bool, device=dev), None, None)


def rope(dev, x=(1, 4, 2, 8), weight=None, cos=None):
    w = None if weight is None else t(dev, *weight)
    c = None if cos is None else t(dev, *cos)
    return lambda: ops.rms_norm_rope(t(dev, *x), w, c, None, 1e-6, True, False)


def tile_reorder(dev, S=16, tile=(2, 2)):
    return lambda: ops.tile_reorder(t(dev, 1, S, 2, 8), [4, 4], list(tile), 0, False)


def scatter_blend(dev, fresh=(1, 2, 8), index_dtype=torch.int64):
    idx = torch.tensor([1, 3], device=dev, dtype=index_dtype)
    return lambda: ops.scatter_blend(t(dev, 1, 8, 8), t(dev, 1, 8, 8), t(dev, *fresh), idx, 0.5, None)


CASES = [
    ("window: k dtype", lambda d: window(d, kdtype=F64), TypeError, "k"),
    ("window: k head dim", lambda d: window(d, k=(1, 16, 2, 4)), ValueError, "k"),
    ("window: q not 4-D", lambda d: window(d, q=(16, 2, 8)), ValueError, "q"),
    ("window: grid vs S", lambda d: window(d, grid=(15,)), ValueError, "grid"),
    ("window: border", lambda d: window(d, border="sideways"), ValueError, "border"),
    ("window: scale", lambda d: window(d, scale=-1.0), ValueError, "scale"),
    ("window: GQA heads", lambda d: window(d, k=(1, 16, 3, 8)), ValueError, "heads"),
    ("window: extra_k alone", lambda d: window(d, extra=True), ValueError, "extra_v"),
    ("linear: k dtype", lambda d: linear(d, kdtype=F64), TypeError, "k"),
    ("linear: feature_map", lambda d: linear(d, feature_map="gelu"), ValueError, "feature_map"),
    ("linear: eps", lambda d: linear(d, eps=-1.0), ValueError, "eps"),
    ("linear: q not 4-D", lambda d: linear(d, q=(16, 2, 8)), ValueError, "q"),
    ("multi_kv: k dtype", lambda d: multi_kv(d, kdtype=F64), TypeError, "ks"),
    ("multi_kv: vs count", lambda d: multi_kv(d, n_vs=2), ValueError, "vs"),
    ("segment: cu_seqlens dtype", lambda d: segment(d, cu_dtype=F32), TypeError, "cu_seqlens"),
    ("segment: q not 4-D", lambda d: segment(d, q=(8, 2, 8)), ValueError, "q"),
    ("rms_norm_rope: weight shape", lambda d: rope(d, weight=(3,)), ValueError, "weight"),
    ("rms_norm_rope: x not 4-D", lambda d: rope(d, x=(4, 2, 8)), ValueError, "x"),
    ("rms_norm_rope: cos without sin", lambda d: rope(d, cos=(4, 8)), ValueError, "sin"),
    ("tile_reorder: grid vs S", lambda d: tile_reorder(d, S=15), ValueError, "grid"),
    ("tile_reorder: tile length", lambda d: tile_reorder(d, tile=(2, 2, 2)), ValueError, "tile"),
    ("scatter_blend: fresh dim", lambda d: scatter_blend(d, fresh=(1, 2, 4)), ValueError, "fresh"),
    ("scatter_blend: index dtype", lambda d: scatter_blend(d, index_dtype=F32), TypeError, "index"),
]


def _error(fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001  (the type is what is compared)
        return e
    return None


def _devices():
    return ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name, case, kind, arg", CASES, ids=[c[0] for c in CASES])
def test_same_error_on_every_path(name, case, kind, arg):
    errors = {dev: _error(case(dev)) for dev in _devices()}
    for dev, e in errors.items():
        assert e is not None, f"{name}: the {dev} path accepted the bad input"
        assert type(e) is kind, f"{name}: the {dev} path raised {type(e).__name__} ({e}), expected {kind.__name__}"
        assert re.search(rf"\b{re.escape(arg)}\b", str(e)), f"{name}: the {dev} path's message does not name {arg}: {e}"
