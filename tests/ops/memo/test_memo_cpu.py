"""MEMO's ops on the CPU (C++ kernels) against the float64 reference; opcheck; bad input."""
import pytest
import torch

import dtk
from dtk.ops.memo.reference import memo_features, memory_linear_attention_reference, memory_update_reference
from ...helpers import assert_matches_reference, bshd, max_err


def _inputs(B, Sq, Sk, H, Hkv, D, Dv, dtype, strided=False):
    q = bshd(B, Sq, H, D, dtype, transposed=strided)
    k = bshd(B, Sk, Hkv, D, dtype, transposed=strided)
    v = bshd(B, Sk, Hkv, Dv, dtype, transposed=strided)
    return q, k, v


def test_memory_matches_reference():
    B, S, H, D = 300, 16, 2, 40
    q, k, v = _inputs(B, S, S, H, H, D, D, torch.float32, strided=True)
    mkv, mz = torch.rand(B, H, D, D), torch.rand(B, H, D)
    out, st = dtk.memory_linear_attention(q, k, v, (mkv, mz), decay=0.9, update_with=4)
    ref64 = memory_linear_attention_reference(q.double(), k.double(), v.double(), mkv.double(), mz.double(), 0.9)
    ref = memory_linear_attention_reference(q, k, v, mkv, mz, 0.9)
    assert_matches_reference(out, ref64, ref, atol=1e-5)
    rkv, rz = memory_update_reference(k[:, -4:].double(), v[:, -4:].double(), mkv.double(), mz.double(), 0.9)
    assert max_err(st[0], rkv) < 1e-5 and max_err(st[1], rz) < 1e-5
    out0, st0 = dtk.memory_linear_attention(q, k, v, update_with=False)
    assert st0 is None
    assert_matches_reference(out0, memory_linear_attention_reference(q.double(), k.double(), v.double()),
                             memory_linear_attention_reference(q, k, v), atol=1e-5)


def test_memory_three_clips_direct():
    """Memory carried over three clips equals the explicit decayed sum over all past frames."""
    B, S, H, D, lam = 7, 16, 2, 16, 0.9
    clips = [_inputs(B, S, S, H, H, D, D, torch.float64) for _ in range(3)]
    state, outs = None, []
    for q, k, v in clips:
        o, state = dtk.memory_linear_attention(q, k, v, state, decay=lam)
        outs.append(o)
    # direct: memory before clip c = sum over earlier clips p of decay^(frames after p's frame j) ...
    for c, (q, k, v) in enumerate(clips):
        fq, fk = memo_features(q, k)
        KV = torch.einsum("bshd,bshe->bhde", fk, v)
        Z = fk.sum(1)
        if c > 0:
            MKV = torch.zeros_like(KV)
            MZ = torch.zeros_like(Z)
            for p in range(c):
                _, kp, vp = clips[p]
                fkp = torch.softmax(kp, 1)
                after = S * (c - 1 - p)   # frames of later clips already folded into the memory
                for j in range(S):
                    w = lam ** (S - 1 - j)
                    MKV += lam ** after * torch.einsum("bhd,bhe->bhde", w * fkp[:, j], w * vp[:, j])
                    MZ += lam ** after * w * fkp[:, j]
            KV = KV + lam * MKV
            Z = Z + lam * MZ
        direct = torch.einsum("bshd,bhde->bshe", fq, KV) / torch.einsum("bshd,bhd->bsh", fq, Z).clamp_min(1e-10)[..., None]
        assert max_err(outs[c], direct) < 1e-12
    assert state[0].dtype == torch.float64


def test_opcheck():
    m = torch.randn(2, 9, 4, 16)
    mv = torch.randn(2, 9, 4, 8)
    mkv, mz = torch.ops.dtk.memory_linear_attention_update(m, mv, None, None, 0.9)
    torch.library.opcheck(torch.ops.dtk.memory_linear_attention.default, (m, m, mv, mkv, mz, 0.9))
    torch.library.opcheck(torch.ops.dtk.memory_linear_attention.default, (m, m, mv, None, None, 0.9))
    torch.library.opcheck(torch.ops.dtk.memory_linear_attention_update.default, (m, mv, mkv, mz, 0.9))


def _raises(match, fn):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fn()


def test_bad_inputs_name_the_argument():
    m = torch.randn(4, 16, 2, 8)
    ml = dtk.memory_linear_attention
    _raises("state\\[0\\]", lambda: ml(m, m, m, (torch.zeros(4, 2, 8, 7), torch.zeros(4, 2, 8))))
    _raises("decay", lambda: ml(m, m, m, decay=1.5))
    _raises("update_with", lambda: ml(m, m, m, update_with=17))
    _raises("same number of heads|q's number of heads", lambda: ml(m, m[:, :, :1], m[:, :, :1]))


def test_cpu_calls_record_the_cpp_engine():
    m = torch.randn(2, 4, 1, 8)
    dtk.memory_linear_attention(m, m, m)
    assert dtk.last_engine("memory_linear_attention_step") == "cpp"
    dtk.memory_linear_attention(m, m, m, update_with=False)
    assert dtk.last_engine("memory_linear_attention") == "cpp"
