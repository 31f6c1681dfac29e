"""The sparse family's engine choice (ops/sparse/engine.py) and its one set of argument checks:
the `engine=` keyword, dtk.last_engine, why cuDNN cannot serve a call, the per-call fallback of a
failing cuDNN call, and the C++ kernel raising what the Meta (fake) path raises. CPU only (the
engine module only inspects tensors; its Triton fallback runs in the interpreter)."""
import os
import re
import warnings

import pytest
import torch

import dtk
from dtk.ops.sparse import engine
from dtk.ops.sparse.reference import multi_kv_attention_reference as mkv_ref

from ...helpers import assert_matches_reference, bshd
from .cases import segments


def _mkv_inputs(device="cpu", dtype=torch.float32):
    q = torch.randn(1, 8, 2, 8, device=device, dtype=dtype)
    ks = [torch.randn(1, L, 2, 8, device=device, dtype=dtype) for L in (4, 5)]
    vs = [torch.randn(1, L, 2, 8, device=device, dtype=dtype) for L in (4, 5)]
    return q, ks, vs


def _seg_inputs(device="cpu"):
    q, k, v = (torch.randn(1, 10, 2, 8, device=device) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    gm = torch.ones(2, 2, dtype=torch.bool, device=device)
    return q, k, v, cu, gm


def test_unknown_engine_lists_the_choices():
    q, ks, vs = _mkv_inputs()
    with pytest.raises(ValueError, match="'auto', 'triton', 'cudnn'.*got 'flash'"):
        dtk.multi_kv_attention(q, ks, vs, engine="flash")
    with pytest.raises(ValueError, match="'auto', 'triton', 'cudnn'"):
        dtk.segment_attention(*_seg_inputs(), engine="cuDNN")


def test_cpu_calls_are_served_by_cpp_whatever_the_pin():
    q, ks, vs = _mkv_inputs()
    out = dtk.multi_kv_attention(q, ks, vs, engine="cudnn")   # a GPU pin: CPU tensors run C++
    assert dtk.last_engine("multi_kv_attention") == "cpp"
    torch.testing.assert_close(out, dtk.multi_kv_attention(q, ks, vs))
    dtk.segment_attention(*_seg_inputs(), engine="triton")
    assert dtk.last_engine("segment_attention") == "cpp"


def test_cudnn_engine_says_why_it_cannot_serve():
    q, ks, _ = _mkv_inputs()
    assert not engine.can_run_cudnn(q, ks, [None, None])
    with pytest.raises(ValueError, match="cuDNN engine of multi_kv_attention.*not a CUDA device"):
        engine.can_run_cudnn(q, ks, [None, None], raise_error=True)
    meta = lambda *s, dt=torch.float32: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    with pytest.raises(ValueError, match="meta, not a CUDA device"):
        engine.can_run_cudnn(meta(1, 8, 2, 8), [meta(1, 4, 2, 8)], None, raise_error=True)
    with pytest.raises(ValueError, match="kv_index"):
        engine.can_run_cudnn(q, ks, [None, torch.tensor([1])], raise_error=True)
    with pytest.raises(ValueError, match="6 K/V segments"):
        engine.can_run_cudnn(q, ks * 3, None, raise_error=True)
    # the dense kernel's own conditions (as on the CPU: the CPU dense kernel takes no float64)
    from dtk.ops._attention.dense import dense_unsupported_reason
    assert "float64" in dense_unsupported_reason(q.double(), ks[0].double())
    assert "GQA" in dense_unsupported_reason(q, ks[0][:, :, :1])
    qs, k, v, cu, gm = _seg_inputs()
    with pytest.raises(ValueError, match="cuDNN engine of segment_attention.*not a CUDA device"):
        engine.can_run_cudnn_segment(qs, k, cu, gm, None, raise_error=True)


def test_engine_constants_agree_with_the_merge_kernel():
    from dtk.ops.sparse.merge import MAX_PARTS
    assert engine.MAX_SEGMENTS == MAX_PARTS


def test_pinned_cudnn_that_cannot_serve_raises():
    q, ks, vs = _mkv_inputs()
    with dtk.config(sparse_engine="cudnn"), pytest.raises(ValueError, match="sparse_engine='cudnn'.*CUDA device"):
        engine.multi_kv_attention(q, ks, vs, [None, None], None, 0.3)


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="interpreter test (CPU only)")
def test_cudnn_failure_falls_back_to_triton_for_that_call_only(monkeypatch):
    """Under "auto" a failing cuDNN call warns once per problem and Triton serves it; the next call
    tries cuDNN again. A pinned cuDNN re-raises."""
    from dtk.ops.sparse import cudnn

    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("cuDNN Frontend error: no engine for this graph")

    monkeypatch.setattr(engine, "can_run_cudnn", lambda *a, **k: True)   # CPU tensors stand for CUDA ones
    monkeypatch.setattr(cudnn, "multi_kv_attention_cudnn", broken)
    q = bshd(1, 11, 2, 16, torch.float32)                                 # a shape no other test warns for
    ks, vs = segments(1, [6, 9], 2, 16, torch.float32)
    r64, _ = mkv_ref(q.double(), [k.double() for k in ks], [v.double() for v in vs])
    rlo, _ = mkv_ref(q, ks, vs)
    with dtk.config(sparse_engine="auto"), pytest.warns(RuntimeWarning, match="cuDNN Frontend error.*Triton"):
        out, _ = engine.multi_kv_attention(q, ks, vs, None, None, 16 ** -0.5)
    assert tries == [1] and dtk.last_engine("multi_kv_attention") == "triton"
    assert_matches_reference(out, r64, rlo)
    with dtk.config(sparse_engine="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)                    # said once per problem
        out, _ = engine.multi_kv_attention(q, ks, vs, None, None, 16 ** -0.5)
    assert tries == [1, 1]                                                # ... but cuDNN is tried again
    assert_matches_reference(out, r64, rlo)
    with dtk.config(sparse_engine="cudnn"), pytest.raises(RuntimeError, match="cuDNN Frontend"):
        engine.multi_kv_attention(q, ks, vs, None, None, 16 ** -0.5)


# --------------------------------------------------------------------------- one set of checks

def _bad_mkv(device):
    q, ks, vs = _mkv_inputs(device)
    return [
        ("ks\\[1\\]", TypeError, (q, [ks[0], ks[1].double()], vs)),                       # a k's dtype
        ("ks\\[1\\]", ValueError, (q, [ks[0], ks[1][..., :4]], [vs[0], vs[1][..., :4]])),  # head dim
        ("q", ValueError, (q[0], ks, vs)),                                                   # q not 4-D
        ("ks\\[0\\]", ValueError, (q, [torch.cat([ks[0]] * 2), ks[1]], vs)),                 # batch
    ]


def _bad_seg(device):
    q, k, v, cu, gm = _seg_inputs(device)
    return [
        ("k", TypeError, (q, k.double(), v, cu, gm)),
        ("k", ValueError, (q, k[..., :4], v[..., :4], cu, gm)),
        ("q", ValueError, (q[0], k, v, cu, gm)),
        ("k", ValueError, (q, torch.cat([k] * 2), torch.cat([v] * 2), cu, gm)),
    ]


def _error(fn):
    with pytest.raises(Exception) as e:
        fn()
    return e.value


@pytest.mark.parametrize("i", range(4))
def test_cpu_kernel_and_meta_path_raise_alike(i):
    """The C++ kernel and the fake (meta) kernel, which runs the Python checks, reject the same
    input with the same exception type and a message naming the same argument."""
    for bad, call in ((_bad_mkv, lambda q, ks, vs: torch.ops.dtk.multi_kv_attention(q, ks, vs, [None, None], None,
                                                                                    None)),
                      (_bad_seg, lambda *a: torch.ops.dtk.segment_attention(*a, None, None))):
        (name, kind, cpu_args), (_, _, meta_args) = bad("cpu")[i], bad("meta")[i]
        for err in (_error(lambda: call(*cpu_args)), _error(lambda: call(*meta_args))):
            assert type(err) is kind, (name, type(err), err)
            assert re.match(name + " ", str(err)), (name, str(err))
