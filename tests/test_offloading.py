"""fastattn with diffusers' offloading: ``enable_model_cpu_offload()`` (accelerate's hooks) and group
offloading (diffusers' HookRegistry, block and leaf level), applied before or after fastattn.

On a CPU the offloading hooks run with onload and offload device both ``cpu``: every hook is
installed and called (forward wrapping, their order against fastattn's), though no weight changes
device. Model CPU offload runs with ``device="cpu"`` the same way. The GPU tests (skipped here)
move the weights for real, group offloading on a side stream included. Compressed outputs with
offloading are bit-identical to the same plan without it."""

import functools

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, get_handle, remove_fastattn
from fastattn.features.offloading import group_offloading_enabled
from experiments.models.tiny import tiny_pixart_pipeline

from conftest import pixart_inputs
from test_cuda_graphs import headwise_case, on_pipeline_device

pytest.importorskip("accelerate")  # the [offload] extra (in dev)

F, W, T, C = Method.FULL, Method.WARS, Method.AST, Method.ASC
CPU = torch.device("cpu")


def layerwise_case():
    def build():
        pipe = tiny_pixart_pipeline(sample_size=16, num_layers=3, num_heads=2, head_dim=8, caption_channels=32, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    plan = CompressionPlan([[F, F, F], [W, T, C], [T, W, F], [C, T, W], [W, C, T], [T, W, C]], window_size=0.3)

    def run(pipe, seed=0):
        return torch.from_numpy(pipe(**on_pipeline_device(pipe, pixart_inputs(steps=6, seed=seed))).images)

    return build, plan, run


def headwise_sd3_case():
    def build():
        return headwise_case("sd3")[0]

    _, plan, _ = headwise_case("sd3")

    def run(pipe, seed=0):
        from experiments.models.tiny import tiny_text_inputs

        inputs = on_pipeline_device(pipe, tiny_text_inputs("sd3", [seed, seed + 1], text_len=5, guidance_scale=4.0))
        return pipe(**inputs, height=16, width=16, num_inference_steps=6, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    return build, plan, run


CASES = {"layerwise": layerwise_case, "headwise": headwise_sd3_case}


def offload(pipe, kind: str, device=CPU) -> None:
    if kind == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.vae.to(device)  # the pipeline's other models stay where the transformer computes
        pipe.transformer.enable_group_offload(onload_device=device, offload_device=CPU, offload_type=f"{kind}_level",
                                              num_blocks_per_group=1 if kind == "block" else None,
                                              use_stream=device.type == "cuda")


def offloading_on(pipe, kind: str) -> bool:
    return hasattr(pipe.transformer, "_hf_hook") if kind == "model" else group_offloading_enabled(pipe.transformer)


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def reference_outputs(family: str):
    """(raw output, the plan's outputs at seeds 0 and 1) without offloading; computed once per family."""
    build, plan, run = CASES[family]()
    pipe = build()
    raw = run(pipe)
    apply_fastattn(pipe, plan)
    expected = [run(pipe, seed) for seed in (0, 1)]
    assert not torch.equal(expected[0], raw)  # the plan changes the output: the tests can see it run
    return raw, expected


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("order", ["offload_first", "fastattn_first"])
@pytest.mark.parametrize("kind", ["model", "block", "leaf"])
@torch.no_grad()
def test_offloading_keeps_compressed_outputs_and_removal_keeps_offloading(family, order, kind):
    build, plan, run = CASES[family]()
    raw, expected = reference_outputs(family)
    pipe = build()
    if order == "offload_first":
        offload(pipe, kind)
        handle = apply_fastattn(pipe, plan)
    else:
        handle = apply_fastattn(pipe, plan)
        offload(pipe, kind)
    for seed in (0, 1):  # two generations: the step counter and caches restart through the hooks
        assert torch.equal(run(pipe, seed), expected[seed])

    remove_fastattn(pipe)
    calls = handle.counter.calls
    assert torch.equal(run(pipe), raw) and offloading_on(pipe, kind)
    assert handle.counter.calls == calls and get_handle(pipe) is None  # a wrapper left on top only passes through
    apply_fastattn(pipe, plan)  # and it applies again over what is left
    assert torch.equal(run(pipe), expected[0])


@pytest.mark.parametrize("kind", ["block", "leaf"])
@torch.no_grad()
def test_fp8_caches_with_group_offloading_equal_fp8_caches_without(kind):
    build, plan, run = CASES["layerwise"]()
    reference = build()
    apply_fastattn(reference, plan, cache_dtype="float8_e4m3fn")
    pipe = build()
    offload(pipe, kind)
    apply_fastattn(pipe, plan, cache_dtype="float8_e4m3fn")
    assert torch.equal(run(pipe), run(reference))


def test_cuda_graphs_are_refused_under_group_offloading():
    build, plan, _ = CASES["layerwise"]()
    pipe = build()
    offload(pipe, "block")
    handle = apply_fastattn(pipe, plan)
    with pytest.raises(ValueError, match="group offloading"):
        handle.enable_cuda_graphs(mode="emulate")


@torch.no_grad()
def test_graphs_recapture_when_model_offloading_moved_the_weights():
    build, plan, run = CASES["layerwise"]()
    pipe = build()
    handle = apply_fastattn(pipe, plan)
    eager = reference_outputs("layerwise")[1][0]
    graphs = handle.enable_cuda_graphs(mode="emulate")
    run(pipe)
    for p in pipe.transformer.parameters():  # what offloading to the host and back does to every weight
        p.data = p.data.clone()
    stale = graphs.stats["stale"]
    assert torch.equal(run(pipe), eager) and graphs.stats["stale"] > stale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("kind", ["model", "block", "leaf"])
@torch.no_grad()
def test_cuda_offloading_keeps_compressed_outputs(family, kind):
    build, plan, run = CASES[family]()
    reference = build().to("cuda")
    apply_fastattn(reference, plan)
    expected = run(reference)
    for order in ("offload_first", "fastattn_first"):
        pipe = build()
        if order == "offload_first":
            offload(pipe, kind, torch.device("cuda"))
            apply_fastattn(pipe, plan, cache_dtype=None)
        else:
            apply_fastattn(pipe, plan)
            offload(pipe, kind, torch.device("cuda"))
        assert torch.equal(run(pipe).cpu(), expected.cpu())
        assert torch.equal(run(pipe).cpu(), expected.cpu())  # weights moved back between generations
