"""Stacked rows with cache-dit's DBCache: a plan with it, a plan searched for the steps it computes
(its middle blocks' cached steps recorded in one calibration generation), and forecast beside its
TaylorSeer calibrator; compute counted from the blocks that ran, below the plan's and the cache's
alone; the transformer as it was after every row."""

import pytest
import torch

from conftest import dit_inputs
from experiments import compare_caches as job
from experiments.compare_caches import comparison_rows, run_compare
from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from test_compare_caches import compose_compare, counted

pytest.importorskip("cache_dit")

STEPS = 4  # compose_compare's solver.num_steps; 3 layers
# F1B0: layer 0 runs at every step, layers 1 and 2 at 0 and 2 (every step after warmup is cached,
# at most one in a row)
CACHE = "{kind: cache_dit, threshold: 10.0, warmup: 1, max_continuous_cached_steps: 1}"
CALIBRATED = "{kind: cache_dit, threshold: 10.0, warmup: 1, max_continuous_cached_steps: 1, calibrator: taylorseer}"
CACHE_KEY = "cache_dit_dbcache_F1B0_R10.0_W1_max_continuous_cached_steps1"
CALIBRATED_KEY = "cache_dit_dbcache_F1B0_R10.0_W1_taylorseer_max_continuous_cached_steps1"
DELTA = "0.5"  # a loose threshold: the plans compress the few steps they may on the tiny model
ROWS = {
    "plan": f"fastattn_{DELTA}+{CACHE_KEY}",
    "under": f"fastattn_forecast_{DELTA}+{CACHE_KEY}+under_cache",
    "calibrated": f"fastattn_forecast_{DELTA}+{CALIBRATED_KEY}+under_cache",
}
OVERRIDES = [
    f"fastattn=['{DELTA}']", f"caches=[{CACHE},{CALIBRATED}]",
    f"stacked=[{{fastattn: '{DELTA}', cache: {CACHE}}},"
    f"{{fastattn: 'forecast:{DELTA}', search_under_cache: true, cache: {CACHE}}},"
    f"{{fastattn: 'forecast:{DELTA}', search_under_cache: true, cache: {CALIBRATED}}}]",
]


def transformer_state(pipe):
    """What a row could leave behind: instance attributes, hooks, submodules, processors."""
    t = pipe.transformer
    return (sorted(t.__dict__), [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in t.named_modules()],
            [id(m.processor) for m in t.modules() if hasattr(m, "processor")])


def plan_alone_compute(pipe, plan) -> float:
    """The plan's counted compute without a cache, over raw's (a fixed plan's does not depend on the inputs)."""
    raw, _ = counted(pipe, dit_inputs(steps=STEPS))
    apply_fastattn(pipe, plan)
    try:
        planned, _ = counted(pipe, dit_inputs(steps=STEPS))
    finally:
        remove_fastattn(pipe)
    return planned.total / raw.total


def test_the_rows_are_named_after_the_plan_and_cache_dit(tmp_path):
    rows = {r["key"]: r for r in comparison_rows(compose_compare(OVERRIDES, tmp_path))}
    assert rows[ROWS["calibrated"]]["method"] == ("fastattn forecast + AST + cache-dit DBCache F1B0 + TaylorSeer, "
                                                  "searched under it")
    assert rows[ROWS["plan"]]["setting"] == f"{DELTA} + R=10.0, W=1, MC=1"


def test_stacked_cache_dit_rows_count_less_than_the_plan_and_the_cache_alone(tmp_path, monkeypatch):
    seen = {}
    open_job = job.open_job

    def opened(cfg):
        out = open_job(cfg)
        pipe = seen["pipe"] = out[-1]
        with torch.no_grad():
            seen["state"], seen["images"] = transformer_state(pipe), pipe(**dit_inputs(steps=STEPS)).images
        return out

    monkeypatch.setattr(job, "open_job", opened)
    rows = {r["key"]: r for r in run_compare(compose_compare(OVERRIDES, tmp_path))["records"][0]["rows"]}
    pipe = seen["pipe"]
    cache_alone = rows[CACHE_KEY]["compute"]
    assert 0 < cache_alone < 1 and 0 < rows[CALIBRATED_KEY]["compute"] < 1
    assert 0 < rows[f"fastattn_{DELTA}"]["compute"] < 1
    assert rows[ROWS["plan"]]["compute"] < min(cache_alone, rows[f"fastattn_{DELTA}"]["compute"])

    for name, cache in (("under", CACHE_KEY), ("calibrated", CALIBRATED_KEY)):
        row = rows[ROWS[name]]
        plan = CompressionPlan.load(tmp_path / "plans" / f"{ROWS[name]}.json")
        assert plan.search["skipped_steps"] == [1, 3]  # the steps cache-dit cached its middle blocks
        assert all(plan.methods[s] == [Method.FULL] * 3 for s in (1, 3))
        alone = plan_alone_compute(pipe, plan)
        assert alone < 1  # the plan compresses step 2
        assert row["compute"] < min(rows[cache]["compute"], alone) and row["psnr_db"] > 0

    assert transformer_state(pipe) == seen["state"]  # every row removed: the transformer as it was
    with torch.no_grad():
        assert torch.equal(torch.as_tensor(pipe(**dit_inputs(steps=STEPS)).images), torch.as_tensor(seen["images"]))
