"""The greedy search (paper Algorithm 1): decisions, thresholds, determinism, trajectory."""

import pytest
import torch

from conftest import LAYERS, dit_inputs
from fastattn.models.adapters.base import ModelAdapter
from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn, search_plan
from fastattn.search import mean_relative_absolute_error

STEPS = 6


def record_outputs(pipe, inputs):
    """Transformer output at every step of one generation."""
    outs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(ModelAdapter.sample(o).clone()))
    try:
        pipe(**inputs)
    finally:
        handle.remove()
    return outs


def test_loss_definition():
    o = torch.tensor([1.0, -2.0, 0.0, 1e-9])
    o2 = torch.tensor([1.5, -2.0, 3.0, -1e-9])
    expected = (0.5 / 1.5 + 0 + 3 / (3 + 1e-6) + min(10, 2e-9 / (1e-9 + 1e-6))) / 4
    assert mean_relative_absolute_error(o, o2) == pytest.approx(expected)
    assert mean_relative_absolute_error(torch.zeros(3), torch.ones(3) * 1e-3) == pytest.approx(0.999, abs=1e-3)


@pytest.mark.parametrize("threshold", [0.05, 0.15])
def test_every_decision_is_below_its_layers_threshold(pipe_and_inputs, threshold):
    pipe, inputs = pipe_and_inputs
    plan = search_plan(pipe, inputs(STEPS), threshold=threshold, progress=False)
    assert (plan.num_steps, plan.num_layers) == (STEPS, LAYERS)
    assert plan.methods[0] == [Method.FULL] * LAYERS  # step 0 stays full
    losses = plan.search["losses"]
    for s in range(1, STEPS):
        for l, m in enumerate(plan.methods[s]):
            if m is Method.FULL:
                assert losses[s][l] is None
            else:
                assert losses[s][l] < (l + 1) / LAYERS * threshold
    assert plan.model["seq_len"] == 64 and plan.model["cfg"] == "batched"
    assert plan.search["threshold"] == threshold and plan.search["seconds"] > 0


@pytest.mark.parametrize("strategies", [["ast", "wars+asc", "wars", "asc"], ["wars"], ["asc"], ["wars+asc"], ["wa"]])
def test_decisions_remeasured_independently(dit_pipe, strategies):
    """Re-measure each decision with plain plan runs (no search machinery, no block replay)."""
    threshold = 0.3
    plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=threshold, strategies=strategies, progress=False)
    decided = [(s, l) for s in range(1, STEPS) for l in range(LAYERS) if plan.methods[s][l] is not Method.FULL]
    assert decided, "the search compressed nothing; the test would be empty"
    full = [Method.FULL] * LAYERS
    for s, l in decided:
        trial_row = plan.methods[s][: l + 1] + full[l + 1:]
        outputs = {}
        for name, row in (("raw", full), ("trial", trial_row)):
            rows = plan.methods[:s] + [row] + [full] * (STEPS - s - 1)
            apply_fastattn(dit_pipe, CompressionPlan(rows, window_size=plan.window_size))
            outputs[name] = record_outputs(dit_pipe, dit_inputs(STEPS))[s]
            remove_fastattn(dit_pipe)
        loss = mean_relative_absolute_error(outputs["raw"], outputs["trial"])
        assert loss == pytest.approx(plan.search["losses"][s][l], rel=1e-5, abs=1e-7)
        assert loss < (l + 1) / LAYERS * threshold


def test_search_trajectory_is_the_compressed_generation(pipe_and_inputs):
    pipe, inputs = pipe_and_inputs
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(m.__dict__.get("forward")))
    plan = search_plan(pipe, inputs(STEPS), threshold=0.15, progress=False)
    hook.remove()
    assert len(calls) == STEPS  # the pipeline saw one transformer call per step
    searched = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: searched.append(ModelAdapter.sample(o).clone()))
    search_plan(pipe, inputs(STEPS), threshold=0.15, progress=False)
    hook.remove()
    apply_fastattn(pipe, plan)
    applied = record_outputs(pipe, inputs(STEPS))
    remove_fastattn(pipe)
    assert all(torch.equal(a, b) for a, b in zip(searched, applied, strict=True))


def test_search_is_deterministic_and_leaves_the_model_alone(dit_pipe):
    raw = dit_pipe(**dit_inputs(STEPS)).images
    a = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.1, progress=False)
    b = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.1, progress=False)
    assert a.methods == b.methods and a.search["losses"] == b.search["losses"]
    assert "forward" not in dit_pipe.transformer.__dict__
    assert not dit_pipe.transformer._forward_pre_hooks
    assert (dit_pipe(**dit_inputs(STEPS)).images == raw).all()


def test_zero_threshold_keeps_everything_full(dit_pipe):
    plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.0, progress=False)
    assert plan.counts()["full"] == STEPS * LAYERS


def test_without_cfg_nothing_is_shared_across_it(dit_pipe):
    plan = search_plan(dit_pipe, dit_inputs(STEPS, guidance=1.0), threshold=0.3, progress=False)
    assert not plan.uses_cfg_sharing()
    assert plan.search["strategies"] == ["ast", "wars"] and plan.model["cfg"] == "none"


def test_strategy_subset_is_respected(dit_pipe):
    plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.3, strategies=["asc", "ast"], progress=False)
    assert set(plan.counts()) >= {"full"} and {m for r in plan.methods for m in r} <= {Method.FULL, Method.AST,
                                                                                     Method.ASC}
    assert plan.search["strategies"] == ["ast", "asc"]  # the paper's order, whatever order was given


@pytest.mark.parametrize("kwargs,error,match", [
    ({"threshold": -0.1}, ValueError, "threshold must be a number >= 0"),
    ({"threshold": "0.1"}, ValueError, "threshold must be a number"),
    ({"strategies": ["full"]}, ValueError, "strategies: 'full' is the fallback"),
    ({"strategies": ["fast"]}, ValueError, "strategies: unknown method 'fast'"),
    ({"window_size": 3}, ValueError, "window_size must be in"),
    ({"loss": "l2"}, ValueError, "loss: unknown loss 'l2'"),
])
def test_bad_search_arguments(dit_pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        search_plan(dit_pipe, dit_inputs(STEPS), progress=False, **kwargs)


def test_search_needs_a_pipeline(dit_pipe):
    with pytest.raises(TypeError, match="needs a pipeline"):
        search_plan(dit_pipe.transformer, {}, progress=False)


def test_search_under_the_published_refresh_rule(dit_pipe):
    plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.3, refresh_on="full_or_asc", progress=False)
    assert plan.refresh_on == "full_or_asc" and plan.refreshing_methods == (Method.FULL, Method.ASC)
    apply_fastattn(dit_pipe, plan)  # the searched plan runs under its own rule
    dit_pipe(**dit_inputs(STEPS))
    with pytest.raises(ValueError, match="refresh_on must be one of"):
        search_plan(dit_pipe, dit_inputs(STEPS), refresh_on="asc", progress=False)
