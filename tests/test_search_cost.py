"""Every searched plan records its cost: the block forwards it ran, weighted by batch rows, over one
raw generation's, and seconds (issue 28, "cost recorded"); counted by hand on tiny models."""

import json

import pytest
import torch

from conftest import LAYERS, dit_inputs
from experiments.run import search_note, search_record
from fastattn import CompressionPlan, search_budget_plan, search_headwise_plan, search_plan
from experiments.models.tiny import TINY_MMDIT_BUILDERS, tiny_text_inputs

STEPS = 4


def algorithm_1_block_calls(layers: int, steps: int, strategies: int) -> int:
    """Algorithm 1 where every trial fails (delta 0): step 0 runs the model once; every later step
    runs the reference (all blocks), at layer i each strategy's trial (blocks i.. after the replayed
    prefix), then block i alone under full attention to record it for the next layer (not after
    the last), then the commit run (all blocks)."""
    trials = strategies * sum(layers - i for i in range(layers))
    per_step = layers + trials + (layers - 1) + layers
    return layers + (steps - 1) * per_step


@pytest.mark.parametrize("guidance, strategies", [(1.0, 2), (4.0, 4)])  # no CFG batch: ast, wars only
def test_an_all_full_search_costs_what_algorithm_1_runs(dit_pipe, guidance, strategies):
    plan = search_plan(dit_pipe, dit_inputs(STEPS, guidance=guidance), threshold=0.0, progress=False)
    assert len(plan.search["strategies"]) == strategies
    cost = plan.search["cost"]
    calls = algorithm_1_block_calls(LAYERS, STEPS, strategies)
    assert cost["block_calls"] == calls  # 63 and 99 here
    assert cost["raw_generations"] == pytest.approx(calls / (LAYERS * STEPS), abs=1e-3)  # every call 1 batch
    assert cost["seconds"] == plan.search["seconds"] > 0


def test_a_passing_search_costs_less_and_the_blocks_are_restored(dit_pipe):
    blocks = dit_pipe.transformer.transformer_blocks
    calls = []
    first = blocks[0].forward
    blocks[0].forward = lambda *a, **k: calls.append(1) or first(*a, **k)  # someone else's wrapper
    try:
        plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=10.0, progress=False)
        assert blocks[0].__dict__["forward"] is not first and calls  # kept under ours, and called
    finally:
        del blocks[0].forward
    # every layer passes its first trial: reference + one trial of blocks i.. per layer + commit
    per_step = 2 * LAYERS + sum(LAYERS - i for i in range(LAYERS))
    assert plan.search["cost"]["block_calls"] == LAYERS + (STEPS - 1) * per_step
    assert all("forward" not in b.__dict__ for b in blocks)


@pytest.mark.parametrize("search", [search_plan, search_budget_plan])  # the search's counter, and common's
def test_the_counter_is_removed_when_the_generation_fails(dit_pipe, search):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    dit_pipe.transformer.transformer_blocks[1].attn1.to_out[0].forward = fail
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            search(dit_pipe, dit_inputs(STEPS), threshold=0.1, progress=False)
    finally:
        del dit_pipe.transformer.transformer_blocks[1].attn1.to_out[0].forward
    assert all("forward" not in b.__dict__ for b in dit_pipe.transformer.transformer_blocks)


def test_budget_search_counts_every_calibration_generation(dit_pipe):
    one = search_budget_plan(dit_pipe, dit_inputs(STEPS), threshold=0.01, progress=False)
    # step 0 commits; later steps run the probing reference and the commit (probes are attention only)
    assert one.search["cost"]["block_calls"] == LAYERS * (1 + 2 * (STEPS - 1))
    assert one.search["cost"]["raw_generations"] == pytest.approx((1 + 2 * (STEPS - 1)) / STEPS, abs=1e-3)
    sensitive = search_budget_plan(dit_pipe, dit_inputs(STEPS), threshold=0.01, sensitivity=True, progress=False)
    assert sensitive.search["cost"]["block_calls"] > one.search["cost"]["block_calls"]  # the per-layer trials
    budgeted = search_budget_plan(dit_pipe, dit_inputs(STEPS), budget=0.6, iterations=3, progress=False)
    runs = len(budgeted.search["bisection"])
    assert budgeted.search["cost"]["raw_generations"] == pytest.approx(runs * 1.75, abs=1e-2)
    assert budgeted.search["cost"]["seconds"] == budgeted.search["seconds"]


def test_headwise_search_costs_one_generation():
    pipe = TINY_MMDIT_BUILDERS["sd3"](sample_size=16, num_heads=2, head_dim=8, num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(tiny_text_inputs("sd3", [0, 1], text_len=5, guidance_scale=4.0), height=16, width=16,
                  num_inference_steps=3, guidance_scale=4.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    plan = search_headwise_plan(pipe, inputs, threshold=0.1, progress=False)
    assert plan.search["cost"]["raw_generations"] == 1.0  # the candidates are computed inside attention
    assert plan.search["cost"]["block_calls"] == 2 * 3


def test_the_cost_survives_saving_and_older_plans_load_without_it(dit_pipe, tmp_path):
    plan = search_plan(dit_pipe, dit_inputs(STEPS), threshold=0.1, progress=False)
    plan.save(tmp_path / "plan.json")
    loaded = CompressionPlan.load(tmp_path / "plan.json")
    assert loaded.search["cost"] == plan.search["cost"]
    assert search_record(loaded)["search_raw_generations"] == plan.search["cost"]["raw_generations"]
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["search"]["cost"]  # as saved before costs were counted
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = CompressionPlan.load(tmp_path / "old.json")
    assert search_record(old) == {"search_algorithm": "greedy", "search_seconds": plan.search["seconds"],
                                  "search_raw_generations": None}


def test_the_summary_names_the_cost():
    assert search_note({"search_seconds": 21.04, "search_raw_generations": 14.63}) == \
        ", search 21.0 s, 14.6 raw generations"
    assert search_note({"search_seconds": 21.04, "search_raw_generations": None}) == ", search 21.0 s"
