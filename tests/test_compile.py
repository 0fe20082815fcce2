"""torch.compile on compressed transformers (dynamo on the CPU: backends "eager" and "aot_eager",
no C compiler): no graph break anywhere in a compressed call, at most the graphs
fastattn.compile.graphs_needed counts, none new at a second generation, the eager outputs, and
plan changes between generations."""

import pytest
import torch
from torch._dynamo.utils import counters

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from fastattn.compile import compile_blocks, graphs_needed

from experiments.models.tiny import tiny_pixart_pipeline

from conftest import CAPTION, pixart_inputs
from test_headwise_models import build as build_mmdit, inputs as mmdit_inputs, model_info as mmdit_info

F, T, W, C, WC = Method.FULL, Method.AST, Method.WARS, Method.ASC, Method.WARS_ASC
STEPS, LAYERS = 3, 2  # every method in three steps of two layers: few graphs to trace


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def breaks() -> dict:
    return dict(counters["graph_break"])


@pytest.fixture
def pipe():
    pipe = tiny_pixart_pipeline(sample_size=16, num_layers=LAYERS, num_heads=2, head_dim=8, caption_channels=CAPTION,
                                seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def every_method_plan() -> CompressionPlan:  # full (refreshing), ast, wars, asc, wars+asc
    return CompressionPlan([[F, F], [T, W], [C, WC]], window_size=0.25)


def no_cfg_plan() -> CompressionPlan:
    return CompressionPlan([[F, F], [W, T], [T, W]], window_size=0.125)


def test_layerwise_whole_transformer_compiles_once_per_step_layout(pipe):
    """aot_eager: a CFG-batched generation and a guidance-1 one with another plan (removed and
    applied between generations) equal their eager runs; no graph break; a second generation
    compiles nothing."""
    apply_fastattn(pipe, every_method_plan())
    eager_cfg = pipe(**pixart_inputs(steps=STEPS)).images
    apply_fastattn(pipe, no_cfg_plan())  # replaces the first plan
    eager_no_cfg = pipe(**pixart_inputs(steps=STEPS, guidance=1.0)).images

    handle = apply_fastattn(pipe, every_method_plan())
    pipe.transformer.compile(backend="aot_eager")
    compiled = pipe(**pixart_inputs(steps=STEPS)).images
    first = graphs()
    assert breaks() == {}
    assert 1 < first <= graphs_needed(handle)["whole"]
    assert abs(compiled - eager_cfg).max() < 1e-5
    again = pipe(**pixart_inputs(steps=STEPS)).images
    assert graphs() == first  # every step replays a graph compiled in the first generation
    assert abs(again - eager_cfg).max() < 1e-5

    remove_fastattn(pipe)
    handle = apply_fastattn(pipe, no_cfg_plan())
    compiled = pipe(**pixart_inputs(steps=STEPS, guidance=1.0)).images
    assert breaks() == {}
    assert graphs() <= first + graphs_needed(handle)["whole"]
    assert abs(compiled - eager_no_cfg).max() < 1e-5


def test_layerwise_blocks_compile_once_per_layer_decision(pipe):
    """Regional compilation: all blocks share one graph per distinct layer decision."""
    handle = apply_fastattn(pipe, every_method_plan())
    eager = pipe(**pixart_inputs(steps=STEPS)).images
    assert compile_blocks(pipe, backend="eager") == LAYERS
    compiled = pipe(**pixart_inputs(steps=STEPS)).images
    first = graphs()
    assert breaks() == {}
    assert first <= graphs_needed(handle)["blocks"]
    assert torch.equal(torch.as_tensor(compiled), torch.as_tensor(eager))
    pipe(**pixart_inputs(steps=STEPS, seed=1))
    assert graphs() == first


def test_headwise_plan_compiles_without_breaks():
    """SD3 (CFG batch): full, arrow, cached and CFG-shared heads, compiled whole."""
    heads, text_len, layers = 3, 5, 2
    pipe = build_mmdit("sd3", heads)
    rows = [[["full"] * heads] * layers,
            [["cache", "arrow:0.0625", "full"], ["full"] * heads],
            [["arrow:0.0625", "cache", "cfg"], ["cache"] * heads]]
    handle = apply_fastattn(pipe, CompressionPlan.from_heads(rows, model=mmdit_info(pipe, text_len)))
    eager = pipe(**mmdit_inputs("sd3", text_len)).images
    pipe.transformer.compile(backend="eager")
    compiled = pipe(**mmdit_inputs("sd3", text_len)).images
    first = graphs()
    assert breaks() == {}
    assert first <= graphs_needed(handle)["whole"]
    assert torch.equal(compiled, eager)
    pipe(**mmdit_inputs("sd3", text_len, seed=1))
    assert graphs() == first


def test_torch_compile_wrapper_is_unwrapped(pipe):
    """torch.compile(pipe.transformer) returns a wrapper: apply and remove reach the model inside."""
    originals = [b.attn1.processor for b in pipe.transformer.transformer_blocks]
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    apply_fastattn(pipe, no_cfg_plan())
    assert [b.attn1.processor for b in pipe.transformer.transformer_blocks] != originals
    remove_fastattn(pipe)
    assert [b.attn1.processor for b in pipe.transformer.transformer_blocks] == originals


def test_graphs_needed_counts_distinct_decisions(pipe):
    handle = apply_fastattn(pipe, every_method_plan())
    needed = graphs_needed(handle)
    assert needed["whole"] == STEPS + 1  # every step differs, and the generation's first call
    assert needed["blocks"] == len({k for s in range(STEPS) for k in handle.state.plan_layer_keys(s)}) + 1
    assert torch._dynamo.config.recompile_limit >= max(needed.values())


def test_cuda_graphs_on_a_compiled_transformer_are_refused_in_one_line(pipe):
    """Compiling and fastattn's CUDA graphs are alternatives: asking for both is one line."""
    compile_blocks(pipe, backend="eager")
    handle = apply_fastattn(pipe, no_cfg_plan())
    with pytest.raises(ValueError, match=r"^cuda_graphs: the transformer \(or its blocks\) is compiled"):
        handle.enable_cuda_graphs(mode="emulate")  # what cuda_graphs=True calls on a CUDA device
    assert handle.graphs is None and not handle.state.static_caches
