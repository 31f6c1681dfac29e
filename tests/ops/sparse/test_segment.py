"""dtk.segment_attention: C++ CPU kernel against the float64 dense-mask reference, errors, opcheck."""
import pytest
import torch

import dtk
from dtk.ops.sparse.reference import segment_attention_reference as ref

from ...helpers import assert_matches_reference, bshd


def check(q, k, v, cu, gm, gb=None, scale=None):
    out, lse = dtk.segment_attention(q, k, v, cu, gm, gb, scale=scale, return_lse=True)
    r64, l64 = ref(q.double(), k.double(), v.double(), cu, gm, None if gb is None else gb.double(), scale)
    rlo, _ = ref(q, k, v, cu, gm, gb, scale)
    assert_matches_reference(out, r64, rlo)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        assert (lse[fin].double() - l64[fin]).abs().max().item() <= 1e-4


def random_layout(G, max_len, g):
    lens = torch.randint(0, max_len, (G,), generator=g)
    cu = torch.zeros(G + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    return cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_sweep(dtype):
    for trial in range(10):
        g = torch.Generator().manual_seed(100 + trial)
        G = 1 + trial % 5
        cu = random_layout(G, 20, g)
        S = int(cu[-1])
        Hkv = [1, 2][trial % 2]
        H = Hkv * [1, 3][trial % 2]
        D = [8, 16, 32][trial % 3]
        tr = trial % 2 == 0
        q = bshd(2, S, H, D, dtype, transposed=tr)
        k, v = bshd(2, S, Hkv, D, dtype, transposed=tr), bshd(2, S, Hkv, D, dtype, transposed=tr)
        gm = torch.rand(G, G, generator=g) > 0.4
        gb = torch.randn(G, G, generator=g, dtype=dtype) if trial % 3 == 0 else None
        check(q, k, v, cu, gm, gb, scale=0.25 if trial % 4 == 0 else None)


def test_ominicontrol_mask_and_bias():
    cu = torch.tensor([0, 6, 22, 38, 54], dtype=torch.int32)   # text, image, cond1, cond2
    gm = dtk.ominicontrol_group_mask(2)
    assert gm.tolist() == [[True] * 4, [True] * 4, [False, False, True, False], [False, False, False, True]]
    gb = torch.zeros(4, 4)
    gb[1, 2] = gb[1, 3] = torch.tensor(0.5).log()                 # log gamma on image -> condition
    q, k, v = (bshd(1, 54, 2, 16, torch.float32) for _ in range(3))
    check(q, k, v, cu, gm, gb)
    # a condition branch sees only itself: equals plain attention within the branch
    out = dtk.segment_attention(q, k, v, cu, gm, gb)
    own = torch.nn.functional.scaled_dot_product_attention(*(t[:, 22:38].transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out[:, 22:38], own.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_lists_accepted_and_masked_rows():
    q, k, v = (bshd(1, 10, 2, 8, torch.float32) for _ in range(3))
    gm = [[True, False], [False, False]]                         # branch 1 sees nothing
    out, lse = dtk.segment_attention(q, k, v, [0, 4, 10], gm, return_lse=True)
    assert torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:])) and torch.isneginf(lse[:, :, 4:]).all()


def test_bad_input_names_the_argument():
    q, k, v = (bshd(1, 10, 2, 8, torch.float32) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    gm = torch.ones(2, 2, dtype=torch.bool)
    bad = [
        ("group_mask", (q, k, v, cu, torch.ones(3, 3, dtype=torch.bool))),
        ("group_mask", (q, k, v, cu, torch.ones(2, 2))),
        ("group_bias", (q, k, v, cu, gm, torch.zeros(3, 2))),
        ("cu_seqlens", (q, k, v, cu.long(), gm)),
        ("cu_seqlens", (q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), gm)),
        ("cu_seqlens", (q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.ones(3, 3, dtype=torch.bool))),
        ("k", (q, k[:, :9], v, cu, gm)),
        ("heads", (bshd(1, 10, 3, 8, torch.float32), k, v, cu, gm)),
    ]
    for name, args in bad:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=f"(?i){name}"):
            dtk.segment_attention(*args)
        with pytest.raises((ValueError, TypeError), match=f"(?i){name}"):   # the C++ kernel checks too
            torch.ops.dtk.segment_attention(*args, *([None] * (6 - len(args))), None)


def test_opcheck():
    q = bshd(2, 12, 4, 8, torch.float32, transposed=True)
    k, v = bshd(2, 12, 2, 8, torch.float32), bshd(2, 12, 2, 8, torch.float32)
    cu = torch.tensor([0, 3, 3, 12], dtype=torch.int32)
    gm = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    torch.library.opcheck(torch.ops.dtk.segment_attention.default, (q, k, v, cu, gm, torch.randn(3, 3), None))
    torch.library.opcheck(torch.ops.dtk.segment_attention.default, (q, k, v, cu, gm, None, 0.5))
