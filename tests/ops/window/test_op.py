"""The public op: argument errors (C++ checks on CPU, Python checks on meta/CUDA), opcheck,
torch.compile, and the CPU engine against the reference for transposed inputs."""
import pytest
import torch

import dtk
from dtk.ops.window.reference import window_attention_reference

from ...helpers import assert_matches_reference


def qkv(S, H=2, Hkv=2, D=8, device="cpu", dtype=torch.float32):
    return (torch.randn(1, S, H, D, device=device, dtype=dtype), torch.randn(1, S, Hkv, D, device=device, dtype=dtype),
            torch.randn(1, S, Hkv, D, device=device, dtype=dtype))


def _bad_cases(device):
    q, k, v = qkv(16, device=device)
    ok = dict(grid=(4, 4), window=3)
    strided = torch.randn(1, 16, 2, 16, device=device)[..., ::2]
    return [
        ("grid", (q, k, v), dict(grid=(4, 5), window=3)),
        ("grid", (q, k, v), dict(grid=(4, 0), window=3)),
        ("grid", (q, k, v), dict(grid=(2, 2, 2, 2), window=3)),
        ("window", (q, k, v), dict(grid=(4, 4), window=0)),
        ("window", (q, k, v), dict(grid=(4, 4), window=(3, -2))),
        ("window", (q, k, v), dict(grid=(4, 4), window=(3, 3, 3))),
        ("radius", (q, k, v), dict(grid=(4, 4), radius=0)),
        ("window", (q, k, v), dict(grid=(4, 4), window=3, radius=2)),
        ("window", (q, k, v), dict(grid=(4, 4))),
        ("border", (q, k, v), dict(ok, border="wrap")),
        ("num_prefix", (q, k, v), dict(grid=(4, 4), window=3, num_prefix=-1)),
        ("tile", (q, k, v), dict(ok, tile=(0, 2))),
        ("tile", (q, k, v), dict(ok, tile=(2, 2, 2))),
        ("scale", (q, k, v), dict(ok, scale=-1.0)),
        ("scale", (q, k, v), dict(ok, scale="0.5")),
        ("window", (q, k, v), dict(grid=(4, 4), window=True)),
        ("tile", (q, k, v), dict(ok, tile=(True, 2))),
        ("head dim", (q[..., :0], k[..., :0], v[..., :0]), ok),
        ("head", (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ok),
        ("k", (q, k.double(), v), ok),
        ("head", qkv(16, H=3, Hkv=2, device=device), ok),
        ("k", (q, torch.randn(1, 16, 2, 4, device=device), v), ok),
        ("q", (q[0], k, v), ok),
        ("contiguous", (strided, k, v), ok),
        ("extra_k", (q, k, v), dict(ok, extra_k=torch.randn(1, 3, 2, 8, device=device))),
        ("extra_k", (q, k, v), dict(ok, extra_k=torch.randn(1, 3, 1, 8, device=device),
                                    extra_v=torch.randn(1, 3, 1, 8, device=device))),
    ]


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_bad_input_names_the_argument(device):
    for name, args, kw in _bad_cases(device):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=f"(?i){name}"):
            dtk.window_attention(*args, **kw)


def test_device_mismatch():
    q, k, v = qkv(16)
    with pytest.raises((ValueError, RuntimeError), match="(?i)device"):
        dtk.window_attention(q, k.to("meta"), v, (4, 4), 3)


def test_opcheck_cpu():
    q, k, v = qkv(3 + 20, H=4, Hkv=2)
    ek, ev = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    torch.library.opcheck(torch.ops.dtk.window_attention.default,
                          (q, k, v, [4, 5], [3, 3], None, "inward", 3, [2, 2], None, ek, ev))
    torch.library.opcheck(torch.ops.dtk.window_attention.default,
                          (q, k, v, [20], None, 3, "clip", 3, None, 0.5, None, None))


def test_torch_compile_fullgraph():
    q, k, v = qkv(2 + 30, H=2)

    def f(q, k, v):
        return dtk.window_attention(q, k, v, (5, 6), radius=2, border="clip", num_prefix=2, return_lse=True)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)


def test_sdpa_layout_inputs_without_copy():
    B, H, S, D = 2, 4, 1 + 36, 16
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    out, lse = dtk.window_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (6, 6), (3, 5),
                                    num_prefix=1, tile=(4, 4), return_lse=True)
    ref, rlse = window_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (6, 6), (3, 5),
                                           num_prefix=1, tile=(4, 4))
    assert_matches_reference(out, ref, ref, atol=1e-10)
    assert_matches_reference(lse, rlse, rlse, atol=1e-10, name="lse")


def test_window_blocks_override(monkeypatch):
    from dtk._config import get

    def window_blocks_override():
        return get("window_blocks")
    monkeypatch.delenv("DTK_WINDOW_BLOCKS", raising=False)
    assert window_blocks_override() is None
    monkeypatch.setenv("DTK_WINDOW_BLOCKS", "128,128")
    assert window_blocks_override() == (128, 128)
    for bad in ("128,48", "8,64", "128"):
        monkeypatch.setenv("DTK_WINDOW_BLOCKS", bad)
        with pytest.raises(ValueError):
            window_blocks_override()
