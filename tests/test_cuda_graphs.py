"""CUDA graphs per step layout: the static-cache bookkeeping (emulated on the CPU: same keys,
static inputs and buffers, eager execution) gives exactly the eager results, keeps every cache
at a fixed address, and recaptures when the inputs change; on a GPU, real graphs match eager."""

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, get_handle, remove_fastattn
from fastattn.cuda_graphs import StepGraphs
from experiments.models.tiny import tiny_dit_pipeline

from conftest import dit_inputs
from test_step_counting import denoise, forward_with_cfg, pipe as wrapper_pipe, plan as wrapper_plan

F, T, W, C, WC = Method.FULL, Method.AST, Method.WARS, Method.ASC, Method.WARS_ASC
STEPS, LAYERS = 8, 3


def every_method_plan() -> CompressionPlan:
    rows = [[F, F, F], [T, W, C], [W, T, WC], [T, W, C], [F, T, WC], [T, W, C], [W, T, WC], [T, W, C]]
    return CompressionPlan(rows, window_size=0.25)


def small_pipe(head_dim=8):
    pipe = tiny_dit_pipeline(sample_size=16, num_layers=LAYERS, num_heads=2, head_dim=head_dim, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, n=2, seed=0):
    return pipe(**dit_inputs(steps=STEPS, n=n, seed=seed)).images


def test_emulated_graphs_reproduce_the_eager_plan_exactly():
    pipe = small_pipe()
    apply_fastattn(pipe, every_method_plan())
    eager = [generate(pipe, seed=s) for s in (0, 1)]
    handle = get_handle(pipe)
    graphs = handle.enable_cuda_graphs(mode="emulate")
    replayed = [generate(pipe, seed=s) for s in (0, 1)]
    for a, b in zip(eager, replayed):
        assert (a == b).all()
    # every layout ran eagerly once, was captured right after and replayed since
    assert graphs.stats["captured"] == len(graphs.graphs) > 1
    assert graphs.stats["eager"] + graphs.stats["replayed"] == 2 * STEPS  # every call counted once
    assert graphs.stats["eager"] == len(graphs.seen)  # a layout runs eagerly only at its first sighting


def cache_pointers(handle):
    return [c.data_ptr() if c is not None else 0 for p in handle.processors for c in (p.output_cache, p.residual)]


def test_static_caches_stay_in_place_across_generations():
    pipe = small_pipe()
    handle = apply_fastattn(pipe, every_method_plan())
    handle.enable_cuda_graphs(mode="emulate")
    generate(pipe)
    pointers = cache_pointers(handle)
    assert sum(1 for ptr in pointers if ptr) == 5  # outputs of layers 0-1, residuals of layers 0-2
    generate(pipe, seed=3)
    assert cache_pointers(handle) == pointers


def test_a_graph_whose_cache_moved_is_not_replayed():
    pipe = small_pipe()
    handle = apply_fastattn(pipe, every_method_plan())
    graphs = handle.enable_cuda_graphs(mode="emulate")
    expected = generate(pipe)
    replayed = graphs.stats["replayed"]
    handle.processors[1].residual = handle.processors[1].residual.clone()  # as if a cache were reallocated
    assert (generate(pipe) == expected).all()
    assert graphs.stats["stale"] > 0 and graphs.stats["replayed"] > replayed


def test_other_inputs_recapture_and_stay_exact():
    pipe = small_pipe()
    apply_fastattn(pipe, every_method_plan())
    eager = [generate(pipe, n=n) for n in (2, 1, 2)]
    graphs = get_handle(pipe).enable_cuda_graphs(mode="emulate")
    for n, expected in zip((2, 1, 2), eager):
        assert (generate(pipe, n=n) == expected).all()  # each batch size has its own graphs
    assert graphs.stats["replayed"] > 0 and graphs.stats["stale"] > 0  # batch 2's caches were reallocated


def test_separate_call_branches_get_their_own_graphs():
    p = wrapper_pipe()
    handle = apply_fastattn(p, wrapper_plan())
    eager = denoise(p, forward_with_cfg)
    graphs = handle.enable_cuda_graphs(mode="emulate")
    for _ in range(2):
        assert torch.equal(denoise(p, forward_with_cfg), eager)
    assert {key[0][0] for key in graphs.graphs} == {0, 1}  # the conditional and unconditional branches
    assert graphs.stats["replayed"] > 0


def test_disabling_and_removing_bring_back_eager_caches():
    pipe = small_pipe()
    handle = apply_fastattn(pipe, every_method_plan())
    handle.enable_cuda_graphs(mode="emulate")
    first = generate(pipe)
    handle.disable_cuda_graphs()
    assert (generate(pipe) == first).all()
    assert all(p.output_cache is None for p in handle.processors)  # freed after last use again
    handle.enable_cuda_graphs(mode="emulate")
    remove_fastattn(pipe)
    assert handle.graphs is None and not handle.state.static_caches


def test_cuda_graphs_need_a_cuda_model_and_a_valid_mode():
    pipe = small_pipe()
    with pytest.raises(ValueError, match="needs the transformer on a CUDA device"):
        apply_fastattn(pipe, every_method_plan(), cuda_graphs=True)
    with pytest.raises(ValueError, match="mode must be"):
        StepGraphs([], mode="replay")
    with pytest.raises(ValueError, match="capture_at"):
        StepGraphs([], mode="emulate", capture_at=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_real_cuda_graphs_match_eager_on_the_gpu():
    pipe = small_pipe(head_dim=16).to("cuda")  # FlexAttention on CUDA needs head_dim >= 16
    apply_fastattn(pipe, every_method_plan())
    eager = [generate(pipe, seed=s) for s in (0, 1)]
    remove_fastattn(pipe)
    handle = apply_fastattn(pipe, every_method_plan(), cuda_graphs=True)
    graphed = [generate(pipe, seed=s) for s in (0, 1)]
    assert not handle.graphs.failed, handle.graphs.failed
    assert handle.graphs.stats["replayed"] > 0
    for a, b in zip(eager, graphed):
        assert abs(a - b).max() < 1e-5


# ------------------------------------------------------------------------------ head-wise plans

def on_pipeline_device(pipe, inputs: dict) -> dict:
    """Prompt embeddings on the device the pipeline computes on (SD3's pipeline passes given
    embeddings through as they are, PixArt's its attention masks); other inputs unchanged."""
    device = pipe._execution_device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def headwise_case(family):
    from experiments.models.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_text_inputs

    if family == "sd3":
        pipe = tiny_sd3_pipeline(sample_size=16, num_layers=2, num_heads=4, head_dim=8)
        pattern = ["cache", "arrow+rs:0.125", "cfg", "full", "arrow:0.125"]
    else:
        pipe = tiny_flux_pipeline(sample_size=16, num_layers=1, num_single_layers=1, num_heads=4, head_dim=16)
        pattern = ["cache", "arrow+rs:0.125", "full", "arrow:0.125"]
    pipe.set_progress_bar_config(disable=True)
    steps = 6
    heads = [[["full"] * 4 for _ in range(2)]] + [
        [[pattern[(s + l + h) % len(pattern)] for h in range(4)] for l in range(2)] for s in range(1, steps)]

    def run(seed):
        inputs = on_pipeline_device(pipe, tiny_text_inputs(family, [seed, seed + 1], text_len=5, guidance_scale=4.0))
        return pipe(**inputs, height=16, width=16, num_inference_steps=steps, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    return pipe, CompressionPlan.from_heads(heads), run


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_headwise_plans_replay_from_graphs_exactly_with_fixed_caches(family):
    pipe, plan, run = headwise_case(family)
    handle = apply_fastattn(pipe, plan)
    eager = [run(s) for s in (0, 1)]
    graphs = handle.enable_cuda_graphs(mode="emulate")
    first = run(0)
    pointers = [c.data_ptr() for p in handle.processors for c in p.park() if c is not None]
    assert torch.equal(first, eager[0]) and torch.equal(run(1), eager[1])
    assert [c.data_ptr() for p in handle.processors for c in p.park() if c is not None] == pointers
    assert pointers and graphs.stats["replayed"] > 0 and not graphs.stats["stale"]
