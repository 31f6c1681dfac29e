"""The window engine's choice (ops/window/engine.py): the `engine=` keyword and the window_engine
setting, the engine recorded per call, and the single-loop engine's reasons for declining. Tiny
CPU shapes; no kernel runs except the C++ one."""
import pytest
import torch

import dtk
from dtk import _config
from dtk.ops.window import engine
from dtk.ops.window.spec import make_spec


def _qkv(S=12, H=2, D=16):
    return (torch.randn(1, S, H, D) for _ in range(3))


def test_unknown_engine_is_an_error_listing_the_choices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'auto', 'triton', 'triton-single-loop'"):
        dtk.window_attention(q, k, v, (3, 4), (3, 3), engine="cudnn")
    with pytest.raises(ValueError, match="window_engine must be one of"):
        with dtk.config(window_engine="fast"):
            pass


def test_cpu_call_records_the_cpp_engine_whatever_is_pinned():
    q, k, v = _qkv()
    for pinned in (None, "auto", "triton", "triton-single-loop"):
        out = dtk.window_attention(q, k, v, (3, 4), (3, 3), engine=pinned)
        assert dtk.last_engine("window_attention") == "cpp" and out.shape == q.shape
    q.requires_grad_()
    dtk.window_attention(q, k, v, (3, 4), (3, 3)).sum().backward()
    assert dtk.last_engine("window_attention_backward") == "cpp"


def test_engine_keyword_scopes_the_setting_to_the_call():
    q, k, v = _qkv()
    with dtk.config(window_engine="triton"):
        dtk.window_attention(q, k, v, (3, 4), (3, 3), engine="triton-single-loop")
        assert _config.get("window_engine") == "triton"
    assert _config.get("window_engine") == "auto"


@pytest.mark.parametrize("why,setup", [
    ("no extra keys", dict(grid=(3, 4), window=(3, 3), extra=2)),
    ("head dims up to 128", dict(grid=(3, 4), window=(3, 3), D=160)),
    ("edge tiles", dict(grid=(9, 11), window=(3, 5), tile=(4, 4))),
    ("dense kernel", dict(grid=(8, 12), window=(3, 5), tile=(4, 4), num_prefix=3, H_kv=1)),
    ("suit TMA", dict(grid=(3, 4), window=(3, 3), strided=True)),
])
def test_pinned_single_loop_engine_declines_with_its_reason(why, setup):
    """A problem the single-loop engine cannot take: can_run_single_loop says False (or raises the
    reason), and a call with the engine pinned raises that reason before any kernel runs."""
    spec = make_spec(setup["grid"], setup["window"], num_prefix=setup.get("num_prefix", 0), tile=setup.get("tile"))
    D = setup.get("D", 16)
    S = spec.seq_len
    q = torch.randn(1, S, 2, D)
    k, v = (torch.randn(1, S, setup.get("H_kv", 2), D) for _ in range(2))
    if setup.get("strided"):
        k = torch.randn(1, S, 2, D + 2)[..., :D]   # heads 18 elements apart: no TMA descriptor
    ek = torch.randn(1, setup["extra"], 2, D) if setup.get("extra") else None
    assert engine.can_run_triton(q, k, v, spec, ek)
    assert not engine.can_run_single_loop(q, k, v, spec, ek)
    with pytest.raises(ValueError, match=why):
        engine.can_run_single_loop(q, k, v, spec, ek, raise_error=True)
    with dtk.config(window_engine="triton-single-loop"), pytest.raises(ValueError, match=why):
        engine.window_attention_triton(q, k, v, spec, D ** -0.5, ek, ek)


def test_single_loop_engine_takes_whole_tiles():
    spec = make_spec((8, 12), (3, 5), tile=(4, 4), num_prefix=5)
    q, k, v = (torch.randn(1, spec.seq_len, 2, 16) for _ in range(3))
    assert engine.can_run_single_loop(q, k, v, spec, None, raise_error=True)
    with dtk.config(window_prefix_by_dense=False):   # its prefix rows need the dense kernel
        assert not engine.can_run_single_loop(q, k, v, spec, None)
