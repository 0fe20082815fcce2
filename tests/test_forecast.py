"""Attention forecasting (``forecast``): the layer's output at step k is the first-order
extrapolation O_b + (O_b - O_a) * (t_k - t_b) / (t_b - t_a) from its last two computed steps
a < b, checked against that definition in float64 in every CFG mode (both branches in one
batch, one call per branch, no CFG), on the timestep and on the step axis; its plan rules,
JSON, FLOPs, CUDA-graph bookkeeping and the greedy search's option."""

import pytest
import torch

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn, search_plan
from fastattn.layerwise.plan import LayerPlan
from fastattn.models import get_adapter
from experiments.models.solvers import make_scheduler
from experiments.models.tiny import tiny_dit_pipeline

from conftest import dit_inputs

F, T, X, W = Method.FULL, Method.AST, Method.FORECAST, Method.WARS
# layer 0: forecast from steps 0 and 1 across an AST step; layer 1: a run of forecasts, then AST;
# layer 2: forecasts from two consecutive computed steps.
ROWS = [[F, F, F], [F, T, F], [T, F, F], [X, F, X], [X, X, F], [F, T, X]]
STEPS = len(ROWS)
NULL_CLASS = 1000


class Context:
    step = branch = 0
    t = 0.0


class DefinitionProcessor:
    """The reference: each CFG branch keeps its own list of (time, output) of computed steps."""

    def __init__(self, layer, inner, ctx, axis):
        self.layer, self.inner, self.ctx, self.axis = layer, inner, ctx, axis
        self.history = {}

    def __call__(self, attn, hidden_states, *args, **kwargs):
        ctx = self.ctx
        method = ROWS[ctx.step][self.layer]
        history = self.history.setdefault(ctx.branch, [])
        now = ctx.t if self.axis == "timestep" else ctx.step
        if method is F:
            out = self.inner(attn, hidden_states, *args, **kwargs)
            history.append((now, out))
            return out
        if method is T:
            return history[-1][1]
        (ta, oa), (tb, ob) = history[-2:]
        return ob + (ob - oa) * ((now - tb) / (tb - ta))


def transformer():
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=3, num_heads=2, head_dim=8, seed=0)
    return pipe.transformer.to(torch.float64)


@torch.no_grad()
def denoise(model, mode, ctx=None):
    """A DiT sampler in float64 with CFG 4 as one batch ('batched'), as two calls per step
    ('separate', FLUX / Wan style), or without CFG ('none'). Karras sigmas: uneven timesteps."""
    scheduler = make_scheduler("dpm_solver")
    scheduler.register_to_config(use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, null = torch.tensor([3, 5]), torch.tensor([NULL_CLASS] * 2)
    for s, t in enumerate(scheduler.timesteps):
        def call(inp, lab, branch):
            if ctx is not None:
                ctx.step, ctx.branch, ctx.t = s, branch, float(t)
            return model(inp, timestep=t.expand(inp.shape[0]), class_labels=lab).sample[:, :4]

        if mode == "batched":
            cond, uncond = call(torch.cat([x, x]), torch.cat([labels, null]), 0).chunk(2)
        elif mode == "separate":
            cond, uncond = call(x, labels, 0), call(x, null, 1)
        else:
            cond = uncond = call(x, labels, 0)
        x = scheduler.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("axis", ["timestep", "step"])
@pytest.mark.parametrize("mode", ["batched", "separate", "none"])
def test_forecast_matches_its_definition_in_float64(mode, axis):
    model = transformer()
    raw = denoise(model, mode)
    layers = get_adapter(model).attention_layers(model)
    originals = [a.processor for a in layers]
    ctx = Context()
    for l, a in enumerate(layers):
        a.set_processor(DefinitionProcessor(l, originals[l], ctx, axis))
    reference = denoise(model, mode, ctx)
    for a, p in zip(layers, originals):
        a.set_processor(p)

    handle = apply_fastattn(model, CompressionPlan(ROWS, forecast_in=axis))
    got = denoise(model, mode)
    assert handle.counter.step == STEPS - 1
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, raw)  # the plan did change the output
    remove_fastattn(model)
    assert torch.equal(denoise(model, mode), raw)


def test_the_two_axes_differ_on_uneven_timesteps():
    model = transformer()
    outs = []
    for axis in ("timestep", "step"):
        apply_fastattn(model, CompressionPlan(ROWS, forecast_in=axis))
        outs.append(denoise(model, "batched"))
    assert not torch.allclose(*outs)


def test_forecast_caches_hold_only_what_the_plan_needs():
    plan = CompressionPlan(ROWS)
    # layer 0 keeps step 0's output through step 1 (which moves it to the history), layer 2's
    # steps 1-2 and 3-4 feed forecasts, layer 1's step 3 output feeds step 4's forecast and step 5's AST
    assert [row[0] for row in plan.history_mask()] == [False, True, False, False, False, False]
    assert [row[2] for row in plan.history_mask()] == [False, False, True, False, True, False]
    assert [row[0] for row in plan.output_cache_mask()] == [True, True, True, True, False, False]
    model = transformer()
    handle = apply_fastattn(model, plan)
    denoise(model, "batched")
    assert all(p.output_cache is None and p.previous_output is None for p in handle.processors)


@pytest.mark.parametrize("rows, step, layer, has", [
    ([[F, F], [X, F]], 1, 0, 1),
    ([[F, F], [F, T], [F, X]], 2, 1, 1),
    ([[F, F], [T, F], [T, F], [X, F]], 3, 0, 1),  # AST steps compute nothing
])
def test_a_forecast_without_two_computed_steps_is_refused_in_one_line(rows, step, layer, has):
    with pytest.raises(ValueError) as err:
        CompressionPlan(rows)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"plan.methods[{step}][{layer}]: 'forecast' needs two earlier computed steps of layer {layer} "
                       f"to extrapolate from (it has {has})")


def test_plan_round_trips_through_json(tmp_path):
    for axis in ("timestep", "step"):
        plan = CompressionPlan(ROWS, window_size=0.25, forecast_in=axis, model={"seq_len": 16, "num_heads": 2,
                                                                                 "head_dim": 8})
        loaded = CompressionPlan.load(plan.save(tmp_path / f"{axis}.json"))
        assert loaded == plan and loaded.forecast_in == axis
        assert ("forecast_in" in plan.to_dict()) == (axis == "step")  # default left out: older readers load it
        assert loaded.counts()["forecast"] == 5
        assert "F" in loaded.render()
    with pytest.raises(ValueError, match=r"^plan.forecast_in must be one of timestep, step, got 'value'$"):
        CompressionPlan(ROWS, forecast_in="value")


def test_forecast_costs_no_attention_flops_like_ast():
    model = {"seq_len": 64, "num_heads": 2, "head_dim": 8}
    forecast = CompressionPlan([[F, F], [F, F], [X, X]], model=model).attention_flops()
    ast = CompressionPlan([[F, F], [F, F], [T, T]], model=model).attention_flops()
    assert forecast == ast and forecast["per_step"][2] == 0


def test_cuda_graphs_refuse_a_forecast_plan_in_one_line():
    pipe = tiny_dit_pipeline(sample_size=16, num_layers=3, num_heads=2, head_dim=8, seed=0)
    message = r"^cuda_graphs: plans with 'forecast' run eagerly .* apply without cuda_graphs$"
    handle = apply_fastattn(pipe, CompressionPlan(ROWS))
    with pytest.raises(NotImplementedError, match=message):
        handle.enable_cuda_graphs(mode="emulate")
    handle = apply_fastattn(pipe, CompressionPlan([[F] * 3] + [[T] * 3] * (STEPS - 1)))
    handle.enable_cuda_graphs(mode="emulate")  # an AST plan is graphed; a forecast plan set later is refused
    with pytest.raises(NotImplementedError, match=message):
        handle.set_plan(CompressionPlan(ROWS))


def test_greedy_search_takes_forecast_only_when_asked(dit_pipe):
    inputs = dit_inputs(steps=8, n=2)
    default = search_plan(dit_pipe, inputs, threshold=0.5, progress=False)
    assert default.counts()["forecast"] == 0 and "forecast" not in default.search["strategies"]
    plan = search_plan(dit_pipe, dit_inputs(steps=8, n=2), threshold=0.1, strategies=["forecast"],
                       forecast_in="step", progress=False)
    assert isinstance(plan, LayerPlan) and plan.forecast_in == "step"
    assert plan.counts()["forecast"] > 0 and plan.search["strategies"] == ["forecast"]
    assert all(row[l] is not X for row in plan.methods[:2] for l in range(3))  # two computed steps first
    apply_fastattn(dit_pipe, plan)
    dit_pipe(**dit_inputs(steps=8, n=2))  # the searched plan runs


def test_greedy_keeps_the_lower_loss_of_equally_cheap_strategies(dit_pipe):
    """AST and forecast both skip the attention: the search tries both and keeps the lower loss
    (the paper's strategies all cost differently). On this tiny model forecast passes the threshold
    at many layers but AST's loss is lower at each, so with both the plan is AST's alone; taking
    the first passing strategy (forecast comes first) would pick forecast there."""
    from fastattn.search.greedy import cost_class

    assert cost_class(Method.AST) == cost_class(Method.FORECAST)
    assert len({cost_class(m) for m in (Method.AST, Method.WARS_ASC, Method.WARS, Method.ASC)}) == 4
    search = lambda strategies: search_plan(dit_pipe, dit_inputs(steps=8, n=2), threshold=0.1,  # noqa: E731
                                            strategies=strategies, progress=False)
    assert search(["forecast"]).counts()["forecast"] > 0
    both, ast = search(["forecast", "ast"]), search(["ast"])
    assert both.methods == ast.methods and both.search["losses"] == ast.search["losses"]


def test_steps_a_block_cache_skips_stay_full_and_count_as_no_computed_step(dit_pipe):
    """search_plan(skipped_steps=...): where a stacked block cache will skip the blocks the plan stays
    full and the search writes no cache, so a forecast at step 2 after a skipped step 1 has one
    computed output (step 0) and cannot run there, where it can without the skip."""
    search = lambda **kw: search_plan(dit_pipe, dit_inputs(steps=6, n=2), threshold=10.0,  # noqa: E731
                                      strategies=["forecast"], progress=False, **kw)
    assert any(m is X for m in search().methods[2])
    plan = search(skipped_steps=[1, 3])
    assert plan.methods[1] == plan.methods[2] == plan.methods[3] == [F] * 3  # step 2: one computed output
    assert all(m is X for m in plan.methods[4]) and plan.search["skipped_steps"] == [1, 3]  # steps 0 and 2
    with pytest.raises(ValueError, match="skipped_steps: step 0 cannot be skipped"):
        search(skipped_steps=[0])


def test_a_compiled_transformer_refuses_a_forecast_plan_in_one_line():
    """The processors record computed steps outside graphs only, so a compiled forecast plan stops
    with the reason instead of a missing-history error."""
    pipe = tiny_dit_pipeline(sample_size=8, num_layers=3, num_heads=2, head_dim=8, seed=0)
    apply_fastattn(pipe, CompressionPlan([[F] * 3, [F] * 3, [X] * 3, [X] * 3]))
    pipe.transformer.compile(backend="eager")
    try:
        with pytest.raises(RuntimeError, match=r"^'forecast' plans run eagerly: a compiled transformer"):
            pipe(**dit_inputs(steps=4, n=1))
    finally:
        pipe.transformer._compiled_call_impl = None
        torch._dynamo.reset()
        remove_fastattn(pipe)
