"""The fast layer-wise search (search_plan(algorithm="fast")): Algorithm 1's rule on predicted
losses, its closed-loop check, its cost, and everything Algorithm 1 honours."""

import pytest
import torch

from conftest import LAYERS, dit_inputs
from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn, search_plan
from fastattn.search.fast import FastSearch, calibration_steps
from fastattn.search import mean_relative_absolute_error
from test_search import STEPS, record_outputs


def fast(pipe, inputs, threshold=0.15, **kwargs):
    return search_plan(pipe, inputs, threshold=threshold, algorithm="fast", progress=False, **kwargs)


@pytest.mark.parametrize("threshold", [0.05, 0.15, 0.3])
def test_every_step_is_within_its_limit_and_the_cost_within_three_generations(pipe_and_inputs, threshold):
    pipe, inputs = pipe_and_inputs
    plan = fast(pipe, inputs(STEPS), threshold)
    assert (plan.num_steps, plan.num_layers) == (STEPS, LAYERS)
    assert plan.methods[0] == [Method.FULL] * LAYERS
    search = plan.search
    assert search["algorithm"] == "fast" and search["threshold"] == threshold
    assert 2 <= search["cost"]["raw_generations"] <= 3.0  # a probe and a commit per step, at least
    for s in range(1, STEPS):
        row = plan.methods[s]
        for l, m in enumerate(row):  # the rule on the predicted losses, as Algorithm 1 on measured ones
            assert (search["losses"][s][l] is None) == (m is Method.FULL)
            if m is not Method.FULL:
                assert search["losses"][s][l] < (l + 1) / LAYERS * threshold
    assert plan.model["seq_len"] == 64 and plan.model["cfg"] == "batched"


def test_the_check_measures_each_committed_step_as_algorithm_1_would(dit_pipe):
    """The loss the search measured at each step's commit is the transformer output's under the
    plan (earlier steps as planned) against the same step all full; with room to correct, every
    step lies below its last compressed layer's limit."""
    threshold = 0.2
    plan = fast(dit_pipe, dit_inputs(STEPS), threshold, max_raw_generations=100)
    compressed = [s for s in range(1, STEPS) if any(m is not Method.FULL for m in plan.methods[s])]
    assert compressed, "nothing was compressed; the test would be empty"
    measured = dict(zip(compressed, [x for x in plan.search["step_losses"] if x is not None], strict=True))
    full = [Method.FULL] * LAYERS
    for s in compressed:
        outputs = {}
        for name, row in (("raw", full), ("plan", plan.methods[s])):
            rows = plan.methods[:s] + [row] + [full] * (STEPS - s - 1)
            apply_fastattn(dit_pipe, CompressionPlan(rows, window_size=plan.window_size))
            outputs[name] = record_outputs(dit_pipe, dit_inputs(STEPS))[s]
            remove_fastattn(dit_pipe)
        loss = mean_relative_absolute_error(outputs["raw"], outputs["plan"])
        assert loss == pytest.approx(measured[s], rel=1e-4, abs=1e-7)
        last = max(l for l, m in enumerate(plan.methods[s]) if m is not Method.FULL)
        assert loss < (last + 1) / LAYERS * threshold


def test_the_search_trajectory_is_the_plans_and_the_model_is_left_alone(dit_pipe):
    raw = dit_pipe(**dit_inputs(STEPS)).images
    searched = []
    hook = dit_pipe.transformer.register_forward_hook(lambda m, a, o: searched.append(o.sample.clone()))
    calls = []
    counter = dit_pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    plan = fast(dit_pipe, dit_inputs(STEPS), 0.2)
    hook.remove()
    counter.remove()
    assert len(calls) == STEPS  # the pipeline saw one transformer call per step
    again = fast(dit_pipe, dit_inputs(STEPS), 0.2)
    assert again.methods == plan.methods and again.search["losses"] == plan.search["losses"]
    apply_fastattn(dit_pipe, plan)
    applied = record_outputs(dit_pipe, dit_inputs(STEPS))
    remove_fastattn(dit_pipe)
    assert len(searched) == STEPS and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(searched, applied))
    assert "forward" not in dit_pipe.transformer.__dict__ and not dit_pipe.transformer._forward_pre_hooks
    assert (dit_pipe(**dit_inputs(STEPS)).images == raw).all()


def test_zero_threshold_keeps_everything_full_and_costs_two_generations(dit_pipe):
    plan = fast(dit_pipe, dit_inputs(STEPS), 0.0)
    assert plan.counts()["full"] == STEPS * LAYERS
    assert plan.search["corrections"] == 0


@pytest.mark.parametrize("strategies", [["forecast", "ast"], ["wars"], ["wa"], ["asc", "ast"]])
def test_strategy_sets_are_honoured(dit_pipe, strategies):
    plan = fast(dit_pipe, dit_inputs(STEPS), 0.3, strategies=strategies)
    used = {m for row in plan.methods for m in row} - {Method.FULL}
    assert used <= {Method.parse(s) for s in strategies}
    apply_fastattn(dit_pipe, plan)  # every plan it makes runs
    dit_pipe(**dit_inputs(STEPS))
    remove_fastattn(dit_pipe)


def test_without_cfg_nothing_is_shared_and_both_refresh_rules_and_windows_run(dit_pipe):
    plan = fast(dit_pipe, dit_inputs(STEPS, guidance=1.0), 0.3)
    assert not plan.uses_cfg_sharing() and plan.model["cfg"] == "none"
    for options in ({"refresh_on": "full_or_asc"}, {"window_shape": "tile"}):
        plan = fast(dit_pipe, dit_inputs(STEPS), 0.3, **options)
        assert all(getattr(plan, k) == v for k, v in options.items())
        apply_fastattn(dit_pipe, plan)
        dit_pipe(**dit_inputs(STEPS))
        remove_fastattn(dit_pipe)


def test_layer_subsets_and_skipped_steps(dit_pipe):
    plan = fast(dit_pipe, dit_inputs(STEPS), 0.5, layers=[1], skipped_steps=[2])
    assert all(row[0] is Method.FULL and row[2] is Method.FULL for row in plan.methods)
    assert plan.methods[2] == [Method.FULL] * LAYERS
    assert any(row[1] is not Method.FULL for row in plan.methods)
    assert plan.search["layers"] == [1] and plan.search["skipped_steps"] == [2]


def test_separate_cfg_calls_use_the_first_calls_decisions():
    from test_cfg_modes import STEPS as WAN_STEPS, wan, wan_inputs

    pipe = wan()
    plan = fast(pipe, wan_inputs(), 0.5)
    assert plan.num_steps == WAN_STEPS
    assert plan.model["cfg"] == "separate" and not plan.uses_cfg_sharing()
    assert plan.search["cost"]["raw_generations"] <= 3.0


def test_a_wrong_model_is_corrected_by_the_check_within_the_budget(dit_pipe, monkeypatch):
    """Gains 100x too small predict every loss 100x too low: the commit's check catches each such
    step, rolls it back and decides it again, so every step still lies within its limit; with no
    room for corrections (max_raw_generations=2) the steps go unchecked."""
    calibrate = FastSearch._calibrate

    def optimistic(self, *args):
        calibrate(self, *args)
        self.layer_gain /= 100

    monkeypatch.setattr(FastSearch, "_calibrate", optimistic)
    threshold = 0.05
    loose = fast(dit_pipe, dit_inputs(STEPS), threshold, max_raw_generations=100)
    assert loose.search["corrections"] > 0
    for row, loss in zip(loose.methods[1:], loose.search["step_losses"], strict=True):
        if loss is not None:
            last = max(l for l, m in enumerate(row) if m is not Method.FULL)
            assert loss < (last + 1) / LAYERS * threshold
    tight = fast(dit_pipe, dit_inputs(STEPS), threshold, max_raw_generations=2)
    assert tight.search["corrections"] == 0
    assert tight.search["cost"]["raw_generations"] < loose.search["cost"]["raw_generations"]
    assert max(x for x in tight.search["step_losses"] if x is not None) >= threshold / LAYERS


@pytest.mark.parametrize("kwargs,match", [
    ({"algorithm": "slow"}, "algorithm must be one of greedy, fast, got 'slow'"),
    ({"algorithm": "fast", "max_raw_generations": 1}, "max_raw_generations must be a number >= 2"),
])
def test_bad_arguments(dit_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_plan(dit_pipe, dit_inputs(STEPS), progress=False, **kwargs)


@pytest.mark.parametrize("steps,layers,expected", [
    (50, 6, {1, 11, 21, 30, 40}),  # 5 x 3.5 passes <= 0.4 x 50
    (50, 28, {1}),  # one calibration of 14.5 passes is already over the share: the first step's only
    (6, 3, {1}),
    (250, 6, {1, 26, 51, 76, 101, 125, 150, 175, 200, 225}),  # at most MAX_CALIBRATIONS
])
def test_calibrations_follow_the_budget(steps, layers, expected):
    assert calibration_steps(steps, layers) == expected


# ------------------------------------------------------------------------------------ the harness
@pytest.mark.parametrize("override", ["search=fast", "search.algorithm=fast"])
def test_the_main_job_runs_the_fast_search_under_its_own_plan_key(tmp_path, override):
    from experiments.run import run
    from experiments.stages.search import plan_key
    from test_run import compose_cfg

    cfg = compose_cfg([override, "threshold=d6", "stages=[search]"], tmp_path)
    assert plan_key(cfg) != plan_key(compose_cfg(["threshold=d6"], tmp_path))  # Algorithm 1's cache entry is another
    run(cfg)
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.search["algorithm"] == "fast" and plan.search["plan_key"] == plan_key(cfg)
    assert plan.search["cost"]["raw_generations"] <= 3.0


@pytest.mark.parametrize("overrides, message", [
    (["search=fast", "search.max_raw_generations=1.5"], r"^search.max_raw_generations must be a number >= 2"),
    (["search=fast", "threshold=rse_0.2"], r"search=fast needs an mrae threshold"),
    (["search.algorithm=slow"], r"^search.algorithm must be one of greedy, fast, headwise, budget, got 'slow'$"),
])
def test_the_main_job_refuses_bad_fast_settings_in_one_line(tmp_path, overrides, message):
    from experiments.infra.app import ConfigError
    from experiments.run import run
    from test_run import compose_cfg

    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(overrides, tmp_path))



def test_a_steps_excess_goes_to_its_methods_by_their_shares():
    """The commit's check refits one correction per method: the prediction moves by the measured
    ratio (to first order), the method with the larger share takes more of it, an unused one none."""
    search = FastSearch.__new__(FastSearch)
    search.weights = {Method.AST: 1.0}
    parts = {Method.WARS_ASC: 3.0, Method.WARS: 1.0}
    search._refit(parts, 1.2, 1.0)
    moved = sum(v * search.weights[m] for m, v in parts.items()) / sum(parts.values())
    assert moved == pytest.approx(1.2, rel=0.01)
    assert search.weights[Method.WARS_ASC] > search.weights[Method.WARS] > 1.0 == search.weights[Method.AST]
    before = search.weights[Method.WARS]
    search._refit({Method.WARS: 1.0}, 0.5, 0.5)  # alone, a smoothed fit: the square root of the ratio
    assert search.weights[Method.WARS] == pytest.approx(before * 0.5 ** 0.5)
