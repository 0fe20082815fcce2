"""The decision trace: what ran at each transformer call of one generation, under a plan, a block
cache, attention caches and separate CFG calls; the comparison's trace.json per row and its resume."""

import json

import pytest
import torch

from conftest import dit_inputs
from experiments.compare_caches import run_compare
from experiments.infra import cache_hooks
from experiments.infra.decision_trace import DecisionTrace
from fastattn import LayerPlan, Method, apply_fastattn, remove_fastattn
from test_compare_caches import compose_compare

STEPS = 6


def traced(pipe, inputs, hooks=None) -> DecisionTrace:
    """The trace of one generation (finished after the pipeline call, as the comparison does)."""
    trace = DecisionTrace(pipe.transformer)
    try:
        with torch.no_grad(), trace.generation(hooks.generation if hooks else None):
            pipe(**inputs)
    finally:
        trace.remove()
    assert trace.done
    return trace


def test_a_raw_generation_runs_every_block_and_full_attention_and_is_recorded_once(dit_pipe):
    trace = DecisionTrace(dit_pipe.transformer)
    with torch.no_grad():
        dit_pipe(**dit_inputs(steps=STEPS))
        assert not trace.done  # no finish(): the generation ends where a second one begins
        dit_pipe(**dit_inputs(steps=STEPS))
    trace.remove()
    record = json.loads(json.dumps(trace.to_dict()))  # JSON as it is
    assert trace.done and record["format"] == 1 and record["cfg"] == "cond_first"
    assert (record["num_blocks"], record["num_attention_layers"]) == (3, 3)
    assert record["window_size"] is None and record["window_shape"] is None
    assert [(c["step"], c["branch"]) for c in record["calls"]] == [(s, 0) for s in range(STEPS)]
    for call in record["calls"]:
        assert call["rows"] == call["call_rows"] == 4  # two samples, both CFG halves in one batch
        assert call["blocks"] == [True] * 3 and call["attention"] == ["full"] * 3 and call["refresh"] == [False] * 3


def test_the_trace_names_the_plans_methods_and_refreshes(dit_pipe):
    c = dit_pipe.transformer.config
    grid = [["full"] * 3, ["wars", "ast", "asc"], ["wars+asc", "ast", "full"], ["full", "wars", "asc"],
            ["ast", "wars", "wars+asc"], ["wars", "full", "ast"]]
    plan = LayerPlan([[Method(m) for m in row] for row in grid], window_size=0.25, window_shape="band",
                     model={"seq_len": (c.sample_size // c.patch_size) ** 2, "num_heads": c.num_attention_heads,
                            "head_dim": c.attention_head_dim})
    apply_fastattn(dit_pipe, plan)
    try:
        trace = traced(dit_pipe, dit_inputs(steps=STEPS))
    finally:
        remove_fastattn(dit_pipe)
    record = trace.to_dict()
    assert record["window_size"] == 0.25 and record["window_shape"] == "band"
    assert [c["attention"] for c in record["calls"]] == grid  # AST runs no projection: its processor ran
    assert [c["refresh"] for c in record["calls"]] == plan.refresh_mask() and any(map(any, plan.refresh_mask()))
    assert all(c["blocks"] == [True] * 3 for c in record["calls"])


def _hooks(pipe, kind: str, **setting):
    return cache_hooks.CacheHooks(pipe, cache_hooks.check_spec({"kind": kind, **setting}, "caches[0]"), STEPS)


def test_first_block_cache_runs_block_0_alone_at_its_cached_steps(dit_pipe):
    hooks = _hooks(dit_pipe, "first_block_cache", threshold=10.0)
    try:
        calls = traced(dit_pipe, dit_inputs(steps=STEPS), hooks).calls
    finally:
        hooks.remove()
    cached = [c for c in calls if not c["blocks"][1]]
    assert cached and len(cached) < len(calls)
    for call in cached:
        assert call["blocks"] == [True, False, False] and call["attention"] == ["full", "skipped", "skipped"]
        assert call["rows"] == 4
    assert all(c["attention"] == ["full"] * 3 for c in calls if c not in cached)


@pytest.mark.parametrize("kind, setting", [("pab", {"skip": 2, "timestep_range": [-1, 1001]}),
                                           ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 1})])
def test_attention_caches_skip_attention_inside_blocks_that_run(dit_pipe, kind, setting):
    hooks = _hooks(dit_pipe, kind, **setting)
    try:
        calls = traced(dit_pipe, dit_inputs(steps=STEPS), hooks).calls
    finally:
        hooks.remove()
    assert all(c["blocks"] == [True] * 3 for c in calls)
    assert any(c["attention"] == ["skipped"] * 3 for c in calls) and calls[0]["attention"] == ["full"] * 3


def test_faster_cache_runs_the_blocks_on_half_the_batch_at_some_calls(dit_pipe):
    hooks = _hooks(dit_pipe, "faster_cache", preset="wide")
    try:
        calls = traced(dit_pipe, dit_inputs(steps=STEPS), hooks).calls
    finally:
        hooks.remove()
    assert all(c["call_rows"] == 4 for c in calls)
    assert {c["rows"] for c in calls} == {2, 4}


def test_separate_cfg_calls_are_the_branches_of_a_step(dit_pipe):
    transformer = dit_pipe.transformer
    c = transformer.config
    latents = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)  # two samples: no CFG batch
    labels = {0: torch.tensor([3, 4]), 1: torch.tensor([c.num_embeds_ada_norm] * 2)}
    trace = DecisionTrace(transformer)
    with torch.no_grad():
        for t in (900, 600, 300):
            for branch in (0, 1):  # conditional, then unconditional pass
                transformer(latents, timestep=torch.tensor([t, t]), class_labels=labels[branch])
        trace.finish()
        transformer(latents, timestep=torch.tensor([100, 100]), class_labels=labels[0])  # after it: not recorded
    record = trace.to_dict()
    assert record["cfg"] is None
    assert [(c["step"], c["branch"]) for c in record["calls"]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(c["rows"] == c["call_rows"] == 2 for c in record["calls"])


def test_the_comparison_writes_each_rows_trace_and_keeps_it_on_resume(tmp_path):
    cfg = compose_compare(["fastattn=[]", "stacked=[]", "samples.batch_size=1",
                           "caches=[{kind:first_block_cache,threshold:10.0}]"], tmp_path)
    rows = run_compare(cfg)["records"][0]["rows"]
    keys = ["raw", "first_block_cache_threshold10.0"]
    assert [r["key"] for r in rows] == keys
    seed_dir = tmp_path / "seed0"
    for row in rows:
        assert row["trace"] == f"samples/{row['key']}/trace.json"
        trace = json.loads((seed_dir / row["trace"]).read_text())
        assert trace["batch_index"] == 0 and trace["batch_size"] == 1 and trace["format"] == 1
        assert [c["step"] for c in trace["calls"]] == list(range(4))  # the first batch only (of two)
        assert all(c["call_rows"] == 2 for c in trace["calls"])
    cached = json.loads((seed_dir / rows[1]["trace"]).read_text())["calls"]
    assert any(not c["blocks"][1] for c in cached)

    # rows generated again (their compare.json gone) keep the trace they have
    path = seed_dir / "samples" / "raw" / "trace.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "kept": True}))
    (seed_dir / "compare.json").unlink()
    again = run_compare(cfg)["records"][0]["rows"]
    assert json.loads(path.read_text())["kept"] and [r["trace"] for r in again] == [r["trace"] for r in rows]
