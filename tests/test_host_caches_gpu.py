"""Host caches on CUDA (fastattn/cache_prefetch.py: side streams, events, reused pinned buffers):
outputs bit-identical to caches on the GPU, and a lower peak. Skipped without a GPU."""

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn
from experiments.models.tiny import tiny_pixart_pipeline

from conftest import dit_inputs, pixart_inputs
from test_cuda_graphs import every_method_plan, headwise_case, small_pipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA streams and pinned memory)")

F, W, T, X = Method.FULL, Method.WARS, Method.AST, Method.FORECAST
FP8 = "float8_e4m3fn"


def dit_run(pipe, plan, **options):
    """Two generations (the second reuses the first one's caches' buffers) and the handle."""
    handle = apply_fastattn(pipe, plan, **options)
    return [pipe(**dict(dit_inputs(steps=8, seed=seed), output_type="pt")).images for seed in (0, 1)], handle


@pytest.mark.parametrize("rows", ["every_method", "forecast"])
@torch.no_grad()
def test_cuda_host_caches_fetched_ahead_are_bit_identical_to_gpu_caches(rows):
    pipe = small_pipe(head_dim=32).to("cuda")
    plan = every_method_plan() if rows == "every_method" else CompressionPlan(
        [[F, F, F], [F, W, F], [X, W, T], [X, F, T], [F, W, X], [T, W, X], [F, F, F], [T, W, T]], window_size=0.25)
    expected, _ = dit_run(pipe, plan)
    got, handle = dit_run(pipe, plan, cache_device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    store = handle.state.cache_store
    copies = store._cuda[torch.device("cuda", torch.cuda.current_device())]
    assert store.prefetcher.misses == 0 and store.prefetcher.hits > 0
    assert copies.reused > 0  # the second generation wrote into the first one's pinned buffers
    fp8, _ = dit_run(pipe, plan, cache_dtype=FP8)
    got, _ = dit_run(pipe, plan, cache_dtype=FP8, cache_device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, fp8))


@torch.no_grad()
def test_cuda_headwise_host_caches_reuse_held_buffers_and_are_bit_identical():
    pipe, plan, run = headwise_case("sd3")
    pipe.to("cuda")
    apply_fastattn(pipe, plan)
    expected = run(0)
    handle = apply_fastattn(pipe, plan, cache_device="cpu")
    assert torch.equal(run(0), expected)
    copies = next(iter(handle.state.cache_store._cuda.values()))
    assert copies.reused > 0 and handle.state.cache_store.prefetcher.misses == 0


@torch.no_grad()
def test_cuda_host_caches_lower_the_peak():
    """Every layer keeps its output from step 0 for AST at every later step: on the GPU all of
    them are held at once; on the host only the reads in flight come back."""
    layers, steps = 12, 6
    pipe = tiny_pixart_pipeline(sample_size=64, num_layers=layers, num_heads=2, head_dim=64, caption_channels=32,
                                seed=0).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    plan = CompressionPlan([[F] * layers] + [[T] * layers] * (steps - 1))

    def peak(**options):
        apply_fastattn(pipe, plan, **options)
        inputs = dict(pixart_inputs(steps=steps), height=64, width=64, output_type="latent")
        inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        pipe(**inputs)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = pipe(**inputs).images
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), out

    on_gpu, expected = peak()
    on_host, got = peak(cache_device="cpu")
    cache = 4 * 1024 * 128 * 4  # one layer's output: 2 images x 2 CFG halves, 32x32 tokens, 128 channels, float32
    assert torch.equal(got, expected)
    # on the host: two fetches and two writes in flight at most, where the GPU holds all twelve
    assert on_host < on_gpu - (layers - 6) * cache, (on_host, on_gpu)
