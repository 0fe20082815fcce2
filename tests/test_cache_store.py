"""FP8 and host caches (fastattn/cache_store.py): the quantise / dequantise helper against float64,
each cached technique against its definition computed with the quantised cache, CUDA graphs with
FP8 caches, host caches bit-identical, and the options' one-line errors."""

import pytest
import torch

from fastattn import CompressionPlan, apply_fastattn, get_handle
from fastattn.cache_store import FP8_MAX, CacheStore, StoredCache, dequantize_fp8, quantize_fp8
from fastattn.family import COND_FIRST, CallInfo
from fastattn.kernels import window_attention, window_half_width
from fastattn.attention_io import project_out, project_qkv

from conftest import dit_inputs
from test_cuda_graphs import every_method_plan, generate, headwise_case, small_pipe
from test_techniques import FRACTION, L, layer, reference_output, step, x

FP8 = "float8_e4m3fn"


def round_trip(t):
    return dequantize_fp8(*quantize_fp8(t), torch.float64)


# ------------------------------------------------------------------------------ the helper
def test_round_trip_error_is_within_half_an_e4m3_step_in_float64_terms():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 50, 8, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 1e3]).view(1, 3, 1, 1)
    values, scale = quantize_fp8(t)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 1, 1)  # one scale per sample and head
    back = dequantize_fp8(values, scale, torch.float64)
    # e4m3: 3 mantissa bits, so a normal value rounds within 2^-4 of itself; below 2^-6 (subnormals)
    # the step is 2^-9 of the scale; float32 arithmetic adds a few 2^-24.
    bound = torch.maximum(t.abs() * 2.0**-4, scale.double() * 2.0**-10) * (1 + 2.0**-20)
    assert ((back - t).abs() <= bound).all()
    # each head's largest magnitude maps to 448 exactly, whatever the heads' scales
    assert torch.equal(values.float().abs().amax(dim=(2, 3)), torch.full((2, 3), FP8_MAX))
    torch.testing.assert_close(scale.double(), t.abs().amax(dim=(2, 3), keepdim=True) / FP8_MAX, rtol=1e-6, atol=0)


def test_scales_per_sample_and_channel_for_layer_outputs_and_samples_independent():
    t = torch.randn(4, 30, 12, generator=torch.Generator().manual_seed(1))
    values, scale = quantize_fp8(t)
    assert scale.shape == (4, 1, 12)  # [batch, tokens, channels]: the projection has mixed the heads
    for b in range(4):  # a sample's cache does not depend on the rest of its batch
        v1, s1 = quantize_fp8(t[b:b + 1])
        assert torch.equal(v1.float(), values[b:b + 1].float()) and torch.equal(s1, scale[b:b + 1])


def test_zeros_stay_zeros_and_a_zero_head_leaves_the_others_alone():
    values, scale = quantize_fp8(torch.zeros(2, 2, 5, 4))
    assert torch.equal(scale, torch.ones_like(scale)) and not values.float().any()
    t = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    t[:, 0] = 0
    back = round_trip(t)
    assert not back[:, 0].any() and torch.allclose(back[:, 1], t[:, 1], rtol=2.0**-4, atol=0)


def test_requantising_a_dequantised_cache_changes_nothing():
    t = torch.randn(2, 3, 20, 8, dtype=torch.bfloat16)
    once = dequantize_fp8(*quantize_fp8(t), torch.float32)
    torch.testing.assert_close(dequantize_fp8(*quantize_fp8(once), torch.float32), once, rtol=1e-6, atol=0)


def test_store_keeps_compute_dtype_and_device_and_static_buffers_in_place():
    store = CacheStore(FP8)
    value = torch.randn(2, 2, 6, 4, dtype=torch.bfloat16)
    held = store.put(None, value)
    assert isinstance(held, StoredCache) and held.data.dtype == torch.float8_e4m3fn
    assert held.nbytes() == value.numel() + 4 * 2 * 2  # one byte a value, a float32 scale per (sample, head)
    out = store.get(held)
    assert out.dtype == torch.bfloat16 and out.shape == value.shape
    pointers = (held.data.data_ptr(), held.scale.data_ptr())
    again = store.put(held, 2 * value, static=True)  # CUDA graphs: the same buffers, overwritten
    assert again is held and (held.data.data_ptr(), held.scale.data_ptr()) == pointers
    torch.testing.assert_close(store.get(held), 2 * out)


def test_host_store_returns_a_copy_equal_to_the_value():
    store = CacheStore(device="cpu")
    value = torch.randn(2, 5, 8)
    held = store.put(None, value)
    out = store.get(held)
    assert torch.equal(out, value)
    out.zero_()  # a processor may write into what it read (the head-wise kernel's out=)
    assert torch.equal(store.get(held), value)


@pytest.mark.parametrize("kwargs, match", [({"cache_dtype": "float16"}, "cache_dtype must be null or one of float8_e4m3fn"),
                                           ({"cache_device": "cuda"}, "cache_device must be null or one of cpu"),
                                           ({"cache_device": "cpu", "cuda_graphs": True}, "does not run under CUDA graphs")])
def test_bad_cache_options_are_one_line_errors(kwargs, match):
    pipe = small_pipe()
    with pytest.raises(ValueError, match=match) as info:
        apply_fastattn(pipe, every_method_plan(), **kwargs)
    assert "\n" not in str(info.value) and get_handle(pipe) is None  # refused before touching the model


# ------------------------------------------------------------------------------ processors
def fp8_layer():
    attn, state, proc = layer()
    state.cache_store = CacheStore(FP8)
    return attn, state, proc


@torch.no_grad()
def test_ast_with_fp8_caches_returns_the_quantised_output():
    attn, state, proc = fp8_layer()
    step(state, "full", keep=True)
    out0 = attn(x(seed=1))
    assert proc.output_cache.data.dtype == torch.float8_e4m3fn
    step(state, "ast", keep=True)
    expected = dequantize_fp8(*quantize_fp8(out0), out0.dtype)
    assert torch.equal(attn(x(seed=2)), expected)
    step(state, "ast")
    assert torch.equal(attn(x(seed=3)), expected) and proc.output_cache is None  # the last AST frees it


@torch.no_grad()
def test_wars_with_fp8_caches_is_the_window_plus_the_quantised_residual():
    attn, state, proc = fp8_layer()
    w = window_half_width(L, FRACTION)
    x0 = x(seed=1)
    step(state, "full", refresh=True)
    attn(x0)
    q, k, v = project_qkv(attn, x0)
    residual = dequantize_fp8(*quantize_fp8(torch.nn.functional.scaled_dot_product_attention(q, k, v)
                                            - window_attention(q, k, v, w)), torch.float32)
    assert proc.residual.scale.shape == (2, q.shape[1], 1, 1)  # per sample and head
    for seed in (2, 3):
        later = x(seed=seed)
        step(state, "wars")
        out = attn(later)
        q, k, v = project_qkv(attn, later)
        torch.testing.assert_close(out, project_out(attn, window_attention(q, k, v, w) + residual, later, torch.float32),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out, reference_output(attn, later, w, residual), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_wars_asc_with_fp8_caches_uses_the_quantised_residuals_conditional_half():
    attn, state, proc = fp8_layer()
    state.on_call(CallInfo(0, 0, COND_FIRST))
    step(state, "full", refresh=True)
    attn(x(seed=1))
    residual = proc._load(proc.residual)
    later = x(seed=2)
    step(state, "wars+asc")
    out = attn(later)
    cond = later[:1]
    q, k, v = project_qkv(attn, cond)
    half = project_out(attn, window_attention(q, k, v, window_half_width(L, FRACTION)) + residual[:1], cond, torch.float32)
    torch.testing.assert_close(out, half.repeat(2, 1, 1), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_headwise_cached_heads_with_fp8_caches_are_the_quantised_previous_outputs():
    """One SD3 joint-attention layer: step 1 caches some heads. With FP8 caches it equals the layer
    run with exact caches into which the quantised step-0 outputs were put (the definition)."""
    from fastattn.headwise.apply import install_headwise
    from experiments.models.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(sample_size=16, num_layers=1, num_heads=4, head_dim=8)
    plan = CompressionPlan.from_heads([[["full"] * 4], [["cache", "arrow:0.125", "cache", "full"]]])
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 64, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    attn = pipe.transformer.transformer_blocks[0].attn

    def layer_run(fp8: bool, put_quantised: bool = False):
        handle = install_headwise(pipe.transformer)
        handle.state.set_plan(plan)
        if fp8:
            handle.state.cache_store = CacheStore(FP8)
        proc = handle.processors[0]
        outputs = []
        for s in range(2):
            handle.state.on_call(CallInfo(s, 0, COND_FIRST))
            if s == 1 and put_quantised:
                proc.head_out = dequantize_fp8(*quantize_fp8(proc.head_out), proc.head_out.dtype)
            outputs.append(attn(image, text))
        handle.uninstall()
        return outputs

    with_fp8, definition, exact = layer_run(True), layer_run(False, put_quantised=True), layer_run(False)
    for a, b in zip(with_fp8, definition):
        for ta, tb in zip(a, b):
            torch.testing.assert_close(ta, tb, atol=1e-6, rtol=1e-6)
    assert not torch.equal(with_fp8[1][0], exact[1][0])  # the quantisation shows where heads are cached


# ------------------------------------------------------------------------------ pipelines
@torch.no_grad()
def test_fp8_caches_stay_close_and_replay_from_emulated_graphs_exactly():
    pipe = small_pipe()
    apply_fastattn(pipe, every_method_plan())
    exact = generate(pipe)
    handle = apply_fastattn(pipe, every_method_plan(), cache_dtype=FP8)
    eager = [generate(pipe, seed=s) for s in (0, 1)]
    assert 0 < abs(eager[0] - exact).max() < 0.05
    graphs = handle.enable_cuda_graphs(mode="emulate")
    replayed = [generate(pipe, seed=s) for s in (0, 1)]
    assert all((a == b).all() for a, b in zip(eager, replayed))
    assert graphs.stats["replayed"] > 0 and not graphs.stats["stale"]
    stored = [c for p in handle.processors for c in p.park() if c is not None]
    assert stored and all(c.data.dtype == torch.float8_e4m3fn for c in stored)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_headwise_fp8_caches_stay_close_and_replay_exactly(family):
    pipe, plan, run = headwise_case(family)
    apply_fastattn(pipe, plan)
    exact = run(0)
    handle = apply_fastattn(pipe, plan, cache_dtype=FP8)
    eager = run(0)
    assert 0 < (eager - exact).abs().max() < 0.05
    handle.enable_cuda_graphs(mode="emulate")
    assert torch.equal(run(0), eager) and torch.equal(run(0), eager)


@torch.no_grad()
def test_host_caches_are_bit_identical_and_refused_under_graphs():
    pipe = small_pipe()
    apply_fastattn(pipe, every_method_plan())
    exact = generate(pipe)
    handle = apply_fastattn(pipe, every_method_plan(), cache_device="cpu")
    assert (generate(pipe) == exact).all()
    with pytest.raises(ValueError, match="host memory"):
        handle.enable_cuda_graphs(mode="emulate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_cuda_host_caches_are_pinned_and_bit_identical_fp8_close():
    pipe = small_pipe().to("cuda")
    plan = every_method_plan()

    def run(**options):
        apply_fastattn(pipe, plan, **options)
        return pipe(**dict(dit_inputs(steps=8), output_type="pt")).images

    exact = run()
    assert torch.equal(run(cache_device="cpu"), exact)
    assert (run(cache_dtype=FP8, cache_device="cpu") - exact).abs().max() < 0.05
    store = CacheStore(FP8, "cpu")
    kept = store.put(None, torch.randn(2, 2, 8, 4, device="cuda"))
    assert kept.data.is_pinned() and kept.data.dtype == torch.float8_e4m3fn and store.get(kept).device.type == "cuda"


# ------------------------------------------------------------------------------ the harness
@pytest.mark.parametrize("override, match", [("cache_dtype=float16", "cache_dtype must be null or one of"),
                                             ("cache_device=cuda", "cache_device must be null or one of")])
def test_main_job_cache_options_are_one_line_config_errors(tmp_path, override, match):
    from experiments.infra.app import ConfigError
    from experiments.infra.config import validate_config
    from test_run import compose_cfg

    with pytest.raises(ConfigError, match=match) as info:
        validate_config(compose_cfg([override], tmp_path))
    assert "\n" not in str(info.value)


def test_cache_quality_job_compares_fp8_samples_with_exact_caches(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.infra.app import CONF_DIR
    from experiments.cache_quality import run_cache_quality
    from test_run import SMALL

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("cache_quality", overrides=["model=tiny_dit", *SMALL, "samples.num=2", "threshold=d6",
                                                  f"plan_cache_dir={tmp_path}/plan_cache"])
    cfg.output_dir = str(tmp_path)
    record = run_cache_quality(cfg)
    assert record["cache_dtype"] == FP8 and record["num_samples"] == 2 and record["psnr_db"] > 20
    assert (tmp_path / "cache_quality.json").is_file()
    assert len(list((tmp_path / "samples" / "cached").glob("*.png"))) == 2
