"""The Table 6 benchmark (experiments.bench.search_time) on the CPU with a tiny DiT: a searched
plan per threshold, records in the main job's layout, and Table 6 built from them (times are not
asserted)."""

import pytest

from analysis.tables import build_tables, load_records
from experiments.app import ConfigError
from experiments.bench.search_time import search_time
from conftest import compose_app

TINY = "models=[{name: tiny_dit, arch: tiny_dit, resolution: 32, steps: 50}]"


def test_table6_from_the_benchmark_runs(tmp_path):
    cfg = compose_app("search_time", [TINY, "thresholds=[raw,d4]", "device=cpu", "dtype=float32",
                                      f"output_dir={tmp_path}"])
    rows = search_time(cfg)
    assert [r["threshold_name"] for r in rows] == ["raw", "d4"]
    assert rows[0]["plan"]["flops_fraction"] == 1.0  # delta 0: every trial fails, the plan stays full
    assert all(r["plan"]["search_seconds"] > 0 and r["raw_latency_s"] > 0 for r in rows)
    assert all(r["plan"]["search_algorithm"] == "greedy" for r in rows)
    # delta 0 tries every strategy at every layer; d4 stops at the first that passes
    assert rows[0]["plan"]["search_raw_generations"] > rows[1]["plan"]["search_raw_generations"] > 1
    table = build_tables(load_records(tmp_path))["table6"]
    cells = {row[2]: row[3:] for row in table.rows}  # the paper's rows, missing ones marked
    assert list(cells) == ["Raw", "D2", "D4", "D6"]
    assert all("–" not in cells[row] for row in ("Raw", "D4"))  # time, generations timed and counted
    assert cells["D2"] == ["–", "–", "–"]


def test_fewer_steps_record_the_50_step_estimate(tmp_path):
    cfg = compose_app("search_time", [TINY.replace("steps: 50", "steps: 3"), "thresholds=[d2]",
                                      "device=cpu", "dtype=float32", f"output_dir={tmp_path}"])
    (row,) = search_time(cfg)
    assert row["solver"] == "dpm_solver_3"
    assert row["estimated_50_step_search_s"] == pytest.approx(row["search_seconds_per_step"] * 49)


@pytest.mark.parametrize("override, message", [
    ("models=[]", "models is empty"),
    (TINY.replace("tiny_dit, resolution", "nope, resolution"), "unknown arch 'nope'"),
    (TINY.replace("steps: 50", "steps: 1"), "steps must be >= 2"),
    ("thresholds=[d2,delta]", "rows are raw or d<k>"),
])
def test_bad_settings_are_one_line_errors(tmp_path, override, message):
    cfg = compose_app("search_time", [override, "device=cpu", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        search_time(cfg)
