"""dtk.config (typed settings in scopes, env defaults), dtk.last_engine and the one tuning cache."""
import threading
import warnings

import pytest
import torch

import dtk
from dtk import _config, _tuning


def test_scope_overrides_and_restores(monkeypatch):
    monkeypatch.delenv("DTK_SPARSE_ENGINE", raising=False)
    assert _config.get("sparse_engine") == "auto"
    with dtk.config(sparse_engine="triton", autotune=False) as now:
        assert now["sparse_engine"] == "triton" and now["autotune"] is False
        with dtk.config(sparse_engine="cudnn"):
            assert _config.get("sparse_engine") == "cudnn" and _config.get("autotune") is False
        assert _config.get("sparse_engine") == "triton"
    assert _config.get("sparse_engine") == "auto" and _config.get("autotune") is True


def test_scope_restores_after_an_error():
    with pytest.raises(RuntimeError):
        with dtk.config(window_mask_by_dot=False):
            raise RuntimeError("boom")
    assert _config.get("window_mask_by_dot") is True


def test_decorator_and_threads():
    @dtk.config(window_mask_by_dot=False)
    def inside():
        return _config.get("window_mask_by_dot")

    assert inside() is False and _config.get("window_mask_by_dot") is True
    seen = []
    with dtk.config(linear_programs_per_sm=4):
        t = threading.Thread(target=lambda: seen.append(_config.get("linear_programs_per_sm")))
        t.start()
        t.join(timeout=30)
    assert seen == [2], "a scope is the calling thread's only"


def test_env_supplies_defaults(monkeypatch):
    monkeypatch.setenv("DTK_SPARSE_ENGINE", "cudnn")
    monkeypatch.setenv("DTK_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("DTK_WINDOW_BLOCKS", "128,64")
    assert _config.get("sparse_engine") == "cudnn" and _config.get("autotune") is False
    assert _config.get("window_blocks") == (128, 64)
    with dtk.config(sparse_engine="triton", window_blocks=None):
        assert _config.get("sparse_engine") == "triton" and _config.get("window_blocks") is None
    for var, bad in (("DTK_SPARSE_ENGINE", "fast"), ("DTK_TRITON_AUTOTUNE", "yes"), ("DTK_WINDOW_BLOCKS", "128")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=var):
            dtk._config.current()
        monkeypatch.delenv(var)


@pytest.mark.parametrize("kw, err, words", [
    (dict(window_engin="triton"), TypeError, ["unknown setting 'window_engin'", "window_engine"]),
    (dict(sparse_engine="fast"), ValueError, ["sparse_engine", "'auto', 'triton', 'cudnn'", "'fast'"]),
    (dict(autotune=1), ValueError, ["autotune", "True, False"]),
    (dict(window_blocks=(128, 48)), ValueError, ["window_blocks", "powers of two"]),
    (dict(linear_programs_per_sm=0), ValueError, ["linear_programs_per_sm", ">= 1"]),
])
def test_bad_settings_name_the_setting_and_choices(kw, err, words):
    with pytest.raises(err) as e:
        dtk.config(**kw)
    for w in words:
        assert w in str(e.value)


def test_config_options_describe_every_setting():
    opts = dtk.config_options()
    assert set(opts) == set(_config.OPTIONS)
    assert "DTK_SPARSE_ENGINE" in opts["sparse_engine"] and "cudnn" in opts["sparse_engine"]


def test_last_engine_unknown_op_is_none():
    assert dtk.last_engine("no_such_op") is None
    _config.record_engine("test_op", "reference")
    assert dtk.last_engine("test_op") == "reference"


def test_fallback_warning_once_per_problem():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _config.fallback_warning("test op", ("problem", 1), RuntimeError("no cuDNN here"), "the Triton engine")
        _config.fallback_warning("test op", ("problem", 2), RuntimeError("no cuDNN here"), "the Triton engine")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 2 and all("no cuDNN here" in m and "Triton engine" in m for m in msgs)


def test_tuning_cache_measures_once_per_key_and_settings(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(_tuning, "capturing", lambda device: False)
    _tuning.clear()
    calls = []

    def measure():
        calls.append(1)
        return len(calls)
    try:
        assert _tuning.choice("test.kind", ("p",), gpu, measure, lambda: 0, settings=("window_mask_by_dot",)) == 1
        assert _tuning.choice("test.kind", ("p",), gpu, measure, lambda: 0, settings=("window_mask_by_dot",)) == 1
        with dtk.config(window_mask_by_dot=False):   # a setting the measured code reads: another key
            assert _tuning.choice("test.kind", ("p",), gpu, measure, lambda: 0, settings=("window_mask_by_dot",)) == 2
        with dtk.config(autotune=False):             # tuning off: the default, nothing cached
            assert _tuning.choice("test.kind", ("q",), gpu, measure, lambda: 0) == 0
        assert _tuning.choice("test.kind", ("r",), torch.device("cpu"), measure, lambda: 0) == 0
        assert len(_tuning.entries("test.kind")) == 2 and len(calls) == 2
        monkeypatch.setattr(_tuning, "capturing", lambda device: True)   # capturing: default, not cached
        assert _tuning.choice("test.kind", ("s",), gpu, measure, lambda: 0) == 0
        assert _tuning.choice("test.kind", ("p",), gpu, measure, lambda: 0, settings=("window_mask_by_dot",)) == 1
    finally:
        _tuning.clear()


def test_info_reports_settings_and_last_engines():
    q = torch.randn(1, 16, 2, 8)
    dtk.window_attention(q, q, q, 16, 3)
    with dtk.config(sparse_engine="triton"):
        d = dtk.info(quiet=True)
        text = dtk._info.format_info(d)
    assert d["settings"]["sparse_engine"] == "triton" and "sparse_engine            'triton'" in text
    assert d["last_engines"]["window_attention"] == "cpp" and "dtk.last_engine" in text
