"""Cache / token-selection ops: C++ kernels against the references, the Triton scatter_blend under
the interpreter, no host sync in mask_to_index, errors, opcheck."""
import os

import pytest
import torch

import dtk
from dtk.ops.reuse.reference import (dilate_mask_reference, mask_to_index_reference, prune_isolated_reference,
                                     scatter_blend_reference, token_change_score_reference)


def _sb_inputs(dtype, B=2, N=12, n=5, tail=(3, 4), shared=False):
    base = torch.randn(B, N, *tail, dtype=dtype)
    cache = torch.randn(B, N, *tail, dtype=dtype)
    fresh = torch.randn(B, n, *tail, dtype=dtype)
    if shared:
        index = torch.randperm(N)[:n]
    else:
        index = torch.stack([torch.randperm(N)[:n] for _ in range(B)])
        if n:
            index[0, -1] = -1                               # padding
    return base, cache, fresh, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lam_kind", ["float", "tensor", "scalar_tensor"])
@pytest.mark.parametrize("shared", [False, True])
def test_scatter_blend_cpu(dtype, lam_kind, shared):
    base, cache, fresh, index = _sb_inputs(dtype, shared=shared)
    lam = {"float": 0.3, "tensor": torch.tensor([0.25, 0.8]), "scalar_tensor": torch.tensor(0.6)}[lam_kind]
    ref, ref_cache = scatter_blend_reference(base, cache, fresh, index, lam)
    c = cache.clone()
    out = dtk.scatter_blend(base, c, fresh, index, lam)
    assert torch.equal(c, ref_cache)
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    idx = index.long().expand(2, -1) if index.dim() == 1 else index.long()
    for b in range(2):                                       # scattered rows are exactly fresh
        ok = idx[b] >= 0
        assert torch.equal(out[b, idx[b][ok]], fresh[b][ok])


def test_scatter_blend_empty_index():
    base, cache, fresh, _ = _sb_inputs(torch.float32, n=0)
    c = cache.clone()
    out = dtk.scatter_blend(base, c, fresh, torch.zeros(0, dtype=torch.int64), 0.5)
    assert torch.equal(c, cache)
    torch.testing.assert_close(out, 0.5 * base + 0.5 * cache)


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="interpreter test (CPU only)")
@pytest.mark.parametrize("per_batch", [False, True])
def test_scatter_blend_triton(per_batch):
    from dtk.ops.reuse.triton import scatter_blend_triton
    base, cache, fresh, index = _sb_inputs(torch.float16, tail=(40,))
    lam_t = torch.tensor([0.1, 0.9]) if per_batch else None
    ref, ref_cache = scatter_blend_reference(base, cache, fresh, index, lam_t if per_batch else 0.4)
    c = cache.clone()
    out = scatter_blend_triton(base, c, fresh, index.to(torch.int32), 0.4, lam_t)
    assert torch.equal(c, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_scatter_blend_errors():
    base, cache, fresh, index = _sb_inputs(torch.float32)
    bad = [
        ("index out of range", dict(index=torch.tensor([[0, 1, 2, 3, 12]] * 2))),
        ("duplicate", dict(index=torch.tensor([[0, 1, 2, 3, 3]] * 2))),
        ("index must be an int", dict(index=index.float())),
        ("index must be", dict(index=index[:, :4])),
        ("cache", dict(cache=cache.double())),
        ("cache", dict(cache=cache[:, :5])),
        ("cache must be contiguous", dict(cache=cache.transpose(2, 3).contiguous().transpose(2, 3))),
        ("fresh", dict(fresh=fresh[..., :2])),
        ("lam", dict(lam=torch.tensor([0.1, 0.2, 0.3]))),
    ]
    for msg, kw in bad:
        args = dict(base=base, cache=cache.clone(), fresh=fresh, index=index, lam=0.5)
        args.update(kw)
        with pytest.raises((ValueError, TypeError, IndexError, RuntimeError), match=f"(?i){msg}"):
            dtk.scatter_blend(**args)
    with pytest.raises(ValueError, match="duplicate"):       # the C++ kernel checks on its own
        torch.ops.dtk.scatter_blend(base, cache.clone(), fresh, torch.tensor([[0, 1, 2, 3, 3]] * 2), 0.5, None)


def test_scatter_blend_opcheck():
    base, cache, fresh, index = _sb_inputs(torch.float32)
    torch.library.opcheck(torch.ops.dtk.scatter_blend.default, (base, cache, fresh, index, 0.3, None))
    torch.library.opcheck(torch.ops.dtk.scatter_blend.default, (base, cache, fresh, index, 0.0, torch.rand(2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_change_score(dtype):
    feats = [torch.randn(2, 8, 16, 16, dtype=dtype), torch.randn(2, 4, 8, 8, dtype=dtype),
             torch.randn(2, 6, 32, 32, dtype=dtype)]
    refs = [torch.randn_like(f) for f in feats]
    for pool, size in ((2, None), (1, None), (4, (16, 16)), (2, (12, 20))):
        s = dtk.token_change_score(feats, refs, pool=pool, size=size)
        r = token_change_score_reference(feats, refs, pool, size)
        assert s.shape == r.shape and s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(s, r)
    same = dtk.token_change_score(feats, feats)
    assert same.abs().max() < 1e-6
    with pytest.raises(ValueError, match="reference"):
        dtk.token_change_score(feats, refs[:2])
    with pytest.raises(ValueError, match="pool"):
        dtk.token_change_score(feats[:1], refs[:1], pool=3)
    torch.library.opcheck(torch.ops.dtk.token_change_score.default, (feats[:2], refs[:2], 2, None))


def test_mask_to_index():
    for B, N, p, P, mc in ((3, 20, 0.3, 0, None), (2, 17, 0.0, 0, None), (2, 17, 1.0, 4, None), (2, 30, 0.5, 3, 6),
                           (1, 0, 0.5, 2, None)):
        mask = torch.rand(B, N) < p
        idx, cnt = dtk.mask_to_index(mask, max_count=mc, num_prefix=P)
        ridx, rcnt = mask_to_index_reference(mask, mc, P)
        assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
        assert torch.equal(idx, ridx) and torch.equal(cnt, rcnt)
    grid = torch.rand(2, 4, 5) < 0.5
    assert torch.equal(dtk.mask_to_index(grid)[0], dtk.mask_to_index(grid.flatten(1))[0])
    with pytest.raises(TypeError, match="mask must be a bool"):
        dtk.mask_to_index(torch.ones(2, 3))
    torch.library.opcheck(torch.ops.dtk.mask_to_index.default, (torch.rand(2, 9) < 0.5, None, 2))


def test_mask_to_index_no_host_sync(monkeypatch):
    """CUDA-free proxy: the op works on meta tensors (no data to read back), returns tensors on the
    mask's device, and never calls .item() / .tolist() / .cpu() on the way."""
    def boom(*a, **k):
        raise AssertionError("host sync")
    mask = torch.rand(2, 64) < 0.3
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    idx, cnt = dtk.mask_to_index(mask, num_prefix=8)
    assert idx.device == mask.device and cnt.device == mask.device
    monkeypatch.undo()
    midx, mcnt = dtk.mask_to_index(mask.to("meta"), num_prefix=8)
    assert midx.device.type == "meta" and midx.shape == (2, 72) and mcnt.shape == (2,)


def test_mask_to_index_feeds_q_index():
    B, S, H, D = 2, 24, 2, 8
    q = torch.randn(B, S, H, D)
    k, v = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    mask = torch.rand(B, S - 4) < 0.4
    idx, cnt = dtk.mask_to_index(mask, num_prefix=4)
    out = torch.zeros(B, S, H, D)
    dtk.multi_kv_attention(q, [k], [v], q_index=idx, out=out)
    dense = dtk.multi_kv_attention(q, [k], [v])
    sel = torch.cat([torch.ones(B, 4, dtype=torch.bool), mask], 1)
    torch.testing.assert_close(out[sel], dense[sel])
    assert torch.equal(out[~sel], torch.zeros_like(out[~sel]))


def test_dilate_and_prune():
    for p in (0.1, 0.5, 0.9):
        m = torch.rand(2, 9, 11) < p
        for it in (0, 1, 2):
            assert torch.equal(dtk.dilate_mask(m, it), dilate_mask_reference(m, it))
        for k in range(9):
            assert torch.equal(dtk.prune_isolated(m, k), prune_isolated_reference(m, k))
    lone = torch.zeros(1, 5, 5, dtype=torch.bool)
    lone[0, 2, 2] = True
    assert not dtk.prune_isolated(lone).any()
    assert dtk.dilate_mask(lone).sum() == 9
    with pytest.raises(ValueError, match="mask must be \\(B, h, w\\)"):
        dtk.dilate_mask(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_neighbors"):
        dtk.prune_isolated(lone, 9)
    torch.library.opcheck(torch.ops.dtk.dilate_mask.default, (torch.rand(2, 5, 6) < 0.3, 2))
    torch.library.opcheck(torch.ops.dtk.prune_isolated.default, (torch.rand(2, 5, 6) < 0.5, 1))


def test_last_engine_on_cpu():
    base, cache, fresh, index = _sb_inputs(torch.float32)
    dtk.scatter_blend(base, cache, fresh, index, 0.5)
    dtk.dilate_mask(torch.zeros(1, 3, 3, dtype=torch.bool))
    assert dtk.last_engine("scatter_blend") == "cpp" and dtk.last_engine("dilate_mask") == "cpp"
