"""The budget search (search=budget): V1's methods chosen step by step by V2's integer program on
measured per-layer errors, at a per-step RSE bound or bisected to an attention FLOPs budget."""

import pytest
import scipy.optimize

from fastattn import CompressionPlan, apply_fastattn, search_budget_plan
from fastattn.layerwise.methods import Method
from fastattn.layerwise.plan import LayerPlan
from fastattn.search.budget import method_costs

from conftest import dit_inputs

STEPS = 6


@pytest.fixture
def milp_calls(monkeypatch):
    calls = []
    real = scipy.optimize.milp

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", counting)
    return calls


def test_method_costs_are_fractions_of_full():
    costs = dict(zip(Method, method_costs(list(Method), 256, 4, 32, 128, 0.125)))
    assert costs[Method.FULL] == 1 and costs[Method.AST] == costs[Method.FORECAST] == 0
    assert costs[Method.ASC] == pytest.approx(0.5) and costs[Method.WARS_ASC] == pytest.approx(costs[Method.WARS] / 2)
    assert 0.5 < costs[Method.WARS] < 1


def test_threshold_plan_is_valid_and_the_solver_runs_only_where_needed(dit_pipe, milp_calls):
    loose = search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), threshold=1e9, progress=False)
    assert isinstance(loose, LayerPlan) and loose.search["algorithm"] == "budget"
    # every layer's cheapest method (AST) fits a loose bound: no integer program, all AST after step 0
    assert milp_calls == [] and loose.methods[0] == [Method.FULL] * 3
    assert all(m is Method.AST for row in loose.methods[1:] for m in row)
    # a bound each layer's AST error fits alone but not all of them together: the solver decides step 1
    step1 = loose.search["layer_rse"][1]
    assert len([e for e in step1 if e > 0]) > 1
    tight = search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), threshold=max(step1), progress=False)
    assert milp_calls and tight.search["step_rse"][1] <= max(step1) + 1e-9
    assert tight.attention_flops()["fraction"] > loose.attention_flops()["fraction"]
    zero = search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), threshold=0, progress=False)
    assert zero == CompressionPlan.all_full(STEPS, 3, model=zero.model, search=zero.search)


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["cfg_batch", "no_cfg"])
def test_budget_plan_meets_the_budget_and_runs(dit_pipe, guidance):
    inputs = dit_inputs(steps=STEPS, guidance=guidance)
    plan = search_budget_plan(dit_pipe, inputs, budget=0.5, strategies=["ast", "wars", "asc", "wars+asc", "forecast"],
                              iterations=5, progress=False)
    fraction = plan.attention_flops()["fraction"]
    assert fraction <= 0.5 and plan.search["budget"] == 0.5
    assert plan.search["bisection"] and all(len(p) == 2 for p in plan.search["bisection"])
    assert max(f for _, f in plan.search["bisection"] if f <= 0.5) == pytest.approx(fraction)
    assert plan.uses_cfg_sharing() is False or guidance > 1  # ASC only where the calls hold a CFG batch
    assert ("asc" in plan.search["strategies"]) == (guidance > 1)
    apply_fastattn(dit_pipe, plan)
    dit_pipe(**dit_inputs(steps=STEPS, guidance=guidance))


def test_output_sensitivity_scales_the_layer_errors(dit_pipe):
    plain = search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), threshold=1e9, progress=False)
    scaled = search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), threshold=1e9, sensitivity=True, progress=False)
    assert scaled.methods == plain.methods and scaled.search["sensitivity"] is True  # all AST either way
    ratios = [s / p for s, p in zip(scaled.search["layer_rse"][1], plain.search["layer_rse"][1])]
    assert all(r > 0 for r in ratios) and len({round(r, 6) for r in ratios}) > 1  # one scale per layer
    for block in dit_pipe.transformer.transformer_blocks:  # the trials' block wrappers are gone
        assert "forward" not in block.__dict__


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, r"^budget must be an attention FLOPs fraction in \(0, 1\], got 0$"),
    ({"budget": 1.5}, r"^budget must be an attention FLOPs fraction in \(0, 1\], got 1.5$"),
    ({"budget": "half"}, r"^budget must be an attention FLOPs fraction in \(0, 1\], got 'half'$"),
    ({"budget": 0.1}, r"^budget 0.1 is below the least a plan of 6 steps reaches, 0.1667 \(step 0 stays full\)$"),
    ({"budget": 0.5, "threshold": 0.1}, r"^search_budget_plan: give exactly one of budget"),
    ({}, r"^search_budget_plan: give exactly one of budget"),
    ({"budget": 0.5, "iterations": 0}, r"^iterations must be an integer >= 1, got 0$"),
])
def test_bad_budgets_are_one_line_errors_before_any_work(dit_pipe, kwargs, message):
    calls = []
    dit_pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message) as error:
        search_budget_plan(dit_pipe, dit_inputs(steps=STEPS), progress=False, **kwargs)
    assert "\n" not in str(error.value) and not calls


def test_the_main_job_runs_the_budget_search(tmp_path):
    from experiments.run import run
    from test_run import compose_cfg

    metrics = run(compose_cfg(["search=budget", "search.budget=0.6", "search.iterations=3", "technique=all_forecast",
                               "stages=[search]"], tmp_path))
    assert metrics == {}
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.search["algorithm"] == "budget" and plan.attention_flops()["fraction"] <= 0.6
    assert "forecast" in plan.search["strategies"]


@pytest.mark.parametrize("overrides, message", [
    (["search.budget=1.5"], r"^search.budget: budget must be an attention FLOPs fraction in \(0, 1\], got 1.5$"),
    (["search.budget=0.1"], r"^search.budget: budget 0.1 is below the least a plan of 5 steps reaches, 0.2 "),
    (["search.budget=null"], r"^threshold.metric: 'mrae' \(threshold d2\) is a DiTFastAttn threshold; "
                             r"search=budget needs an rse threshold"),
    (["search.iterations=0"], r"^search.iterations must be an integer >= 1, got 0$"),
])
def test_the_main_job_refuses_a_bad_budget_in_one_line(tmp_path, overrides, message):
    from experiments.infra.app import ConfigError
    from experiments.run import run
    from test_run import compose_cfg

    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(["search=budget", *overrides], tmp_path))
