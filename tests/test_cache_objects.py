"""dtk.cache: refresh policies, per-layer K/V and output caches, byte accounting, offload, reset,
and no shared state between instances."""
import pytest
import torch

from dtk.cache import KVCache, OutputCache, RefreshPolicy


def test_policy():
    assert [RefreshPolicy().should_write(s) for s in range(4)] == [True, False, False, False]
    assert [RefreshPolicy(every=3).should_write(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert [RefreshPolicy(every=2, first=1).should_write(s) for s in range(5)] == [True, True, False, True, False]
    with pytest.raises(ValueError, match="every"):
        RefreshPolicy(every=0)


def test_kv_cache_refresh_and_reads():
    cache = KVCache(RefreshPolicy(every=2))
    calls = []

    def compute(step):
        calls.append(step)
        return torch.full((1, 4, 2, 8), float(step)), torch.full((1, 4, 2, 8), -float(step))
    for step in range(5):
        cache.set_step(step)
        k, v = cache.get_or_compute("layer0", lambda: compute(step))
        assert k[0, 0, 0, 0].item() == (step // 2) * 2
    assert calls == [0, 2, 4]
    assert cache.writes == 3 and cache.reads == 2
    assert cache.nbytes == 2 * 4 * 2 * 8 * 4 and len(cache) == 1
    cache.reset()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.step == 0
    with pytest.raises(KeyError, match="layer0"):
        cache.read("layer0")


def test_in_place_updates_persist():
    cache = KVCache()
    k, v = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    cache.write(0, k, v)
    ck, _ = cache.read(0)
    ck[:, 1] = 5.0                                  # e.g. dtk.scatter_blend into the cached K
    assert cache.read(0)[0][0, 1, 0, 0] == 5.0


def test_offload_keeps_a_copy():
    cache = KVCache(offload=True)
    k = torch.randn(1, 3, 2, 4)
    cache.write("a", k, k * 2)
    k.zero_()                                        # the cache holds its own copy
    rk, rv = cache.read("a")
    assert torch.equal(rv, rk * 2) and rk.abs().sum() > 0
    assert cache.nbytes_on("cpu") == cache.nbytes == 2 * 3 * 2 * 4 * 4
    assert cache.nbytes_on("cuda") == 0


def test_two_caches_are_independent():
    a, b = KVCache(), KVCache(RefreshPolicy(every=1))
    a.write(0, torch.ones(1), torch.ones(1))
    assert 0 in a and 0 not in b and len(b) == 0
    b.set_step(3)
    a.set_step(1)
    assert b.step == 3 and not a.should_write(0) and b.should_write(0)


def test_output_cache():
    oc = OutputCache(RefreshPolicy(every=3))
    n = 0

    def compute():
        nonlocal n
        n += 1
        return torch.full((2, 3), float(n))
    vals = []
    for step in range(7):
        oc.set_step(step)
        vals.append(oc.get_or_compute(("block", 4), compute)[0, 0].item())
    assert vals == [1, 1, 1, 2, 2, 2, 3] and n == 3
    assert oc.nbytes == 2 * 3 * 4 and oc.layers() == [("block", 4)]
    oc.next_step()
    assert oc.step == 7
