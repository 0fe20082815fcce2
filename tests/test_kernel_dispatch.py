"""The kernel dispatcher's choice, on the CPU: which backend runs each kind of call for a given
GPU generation, dtype, head dim and setting, and the context manager that restores the setting.
The GPU checks are patched; no kernel beyond masked SDPA runs here."""

import pytest
import torch

import fastattn.kernels.attention as attention
import fastattn.kernels.flex as flex
import fastattn.kernels.triton_band as triton_band
from fastattn.kernels import (attention_backend, dispatch, fa4, fa4_mode, get_fa4, get_window_backend, set_fa4,
                              set_window_backend, tile_attention)
from fastattn.kernels.dispatch import KINDS, choose


@pytest.fixture
def gpu(monkeypatch):
    """Every backend 'available' on an SM90 GPU; ``gpu(major=..., flex=..., triton=...)`` changes that."""
    def set_up(major=9, flex_ok=True, triton_ok=True):
        monkeypatch.setattr(fa4, "fa4_importable", lambda: True)
        monkeypatch.setattr(fa4, "_arch_major", lambda device: major)
        monkeypatch.setattr(flex, "flex_available", lambda q: flex_ok)
        monkeypatch.setattr(triton_band, "triton_available", lambda q: triton_ok and q.dtype != torch.float32)
    set_up()
    yield set_up
    dispatch.configure("auto", fa4="auto")


def q_of(dtype=torch.bfloat16, dim=64):
    return torch.zeros(1, 2, 8, dim, dtype=dtype)


def choices(q):
    return {kind: choose(q, kind) for kind in KINDS}


def test_a_cpu_runs_everything_on_sdpa():
    assert set(choices(q_of()).values()) == {"sdpa"}
    assert set(choices(q_of(torch.float32, 8)).values()) == {"sdpa"}


def test_auto_prefers_fa4_then_flex_then_triton(gpu):
    assert set(choices(q_of()).values()) == {"fa4"}  # SM90: dense, band, refresh and block-sparse
    gpu(major=10)  # SM100: the block-sparse kinds stay on FlexAttention
    assert choices(q_of()) == {"dense": "fa4", "window": "fa4", "refresh": "fa4", "tile": "flex",
                               "video": "flex", "arrow": "flex"}
    gpu(major=8)
    assert choices(q_of()) == {"dense": "sdpa", "window": "flex", "refresh": "flex", "tile": "flex",
                               "video": "flex", "arrow": "flex"}
    gpu(major=8, flex_ok=False)
    assert choices(q_of()) == {"dense": "sdpa", "window": "triton", "refresh": "triton", "tile": "sdpa",
                               "video": "sdpa", "arrow": "sdpa"}


def test_dtype_head_dim_and_mode_constraints(gpu):
    assert choices(q_of(torch.float32))["window"] == "flex"  # FA4 and Triton take fp16/bf16 only
    assert choose(q_of(dim=260), "dense") == "sdpa"  # past FA4's head dims
    gpu(flex_ok=False)
    assert choose(q_of(), "arrow") == "sdpa"  # the arrow's FA4 route falls back to FlexAttention
    with fa4_mode("off"):
        assert choose(q_of(), "dense") == "sdpa" and choose(q_of(), "window") == "triton"


def test_a_named_backend_serves_every_windowed_kind_it_has(gpu):
    with attention_backend("flex"):
        assert choices(q_of()) == {"dense": "fa4", "window": "flex", "refresh": "flex", "tile": "flex",
                                   "video": "flex", "arrow": "flex"}  # dense follows the FA4 mode only
    with attention_backend("triton"):  # no tile kernel: those kinds stay on auto
        assert choices(q_of()) == {"dense": "fa4", "window": "triton", "refresh": "triton", "tile": "fa4",
                                   "video": "fa4", "arrow": "fa4"}
    with attention_backend("sdpa"):
        assert choices(q_of()) == {"dense": "fa4", **{kind: "sdpa" for kind in KINDS[1:]}}


def test_a_named_backend_that_cannot_run_is_one_line(gpu):
    gpu(major=10)
    with attention_backend("fa4"):
        assert choose(q_of(), "window") == "fa4"
        with pytest.raises(RuntimeError, match=r"^window backend 'fa4' needs flash-attn-4 .*SM90 for the block-sparse"):
            choose(q_of(), "tile")
    with attention_backend("triton"), pytest.raises(RuntimeError, match="^window backend 'triton' needs CUDA, Triton"):
        choose(q_of(torch.float32), "window")


def test_the_context_manager_restores_the_previous_setting():
    assert (get_window_backend(), get_fa4()) == ("auto", "auto")
    with attention_backend("flex", fa4="off") as inside:
        assert inside == dispatch.current() and (get_window_backend(), get_fa4()) == ("flex", "off")
        with attention_backend("sdpa"):
            assert (get_window_backend(), get_fa4()) == ("sdpa", "off")
        assert get_window_backend() == "flex"
    with pytest.raises(KeyError), attention_backend("triton"):
        raise KeyError  # restored on the way out of an error too
    assert (get_window_backend(), get_fa4()) == ("auto", "auto")
    with pytest.raises(ValueError, match="^window backend must be one of auto, fa4, triton, flex, sdpa"):
        attention_backend("cudnn").__enter__()
    assert get_window_backend() == "auto"


def test_the_old_switches_are_the_dispatchers_setting():
    try:
        set_window_backend("sdpa")
        set_fa4(False)
        assert dispatch.current() == dispatch.Settings(backend="sdpa", fa4="off")
        with fa4_mode("auto"):
            assert dispatch.current().fa4 == "auto"
        assert get_fa4() == "off"
    finally:
        dispatch.configure("auto", fa4="auto")


def test_declared_constraints_and_the_registry():
    assert dispatch.PREFERENCE == ("fa4", "flex", "triton", "sdpa")
    assert set(dispatch.BACKENDS) == set(dispatch.WINDOW_BACKENDS) - {"auto"}
    triton = dispatch.BACKENDS["triton"]
    assert triton.kinds == ("window", "refresh") and triton.min_head_dim == 16
    assert not triton.fits(q_of()) and not flex.FLEX.fits(q_of())  # CPU tensors
    assert fa4.FA4.fits(q_of()) and not fa4.FA4.fits(q_of(torch.float32))
    with pytest.raises(ValueError, match="unknown attention backend"):
        dispatch.register(dispatch.Backend("cudnn", ("dense",), needs=""))


def test_tile_attention_honours_a_named_backend(gpu, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    calls = []
    monkeypatch.setattr(flex, "compiled_flex", lambda: flex_attention)  # eager FlexAttention on the CPU
    real = attention.flex_attention_call
    monkeypatch.setattr(attention, "flex_attention_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    gpu(major=8)  # no FA4: auto takes FlexAttention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 36, 16, generator=g) for _ in range(3))
    auto = tile_attention(q, k, v, 1, 6)
    assert len(calls) == 1
    with attention_backend("sdpa"):
        named = tile_attention(q, k, v, 1, 6)
    assert len(calls) == 1  # the masked SDPA ran, not FlexAttention
    torch.testing.assert_close(named, auto, atol=1e-5, rtol=1e-5)
