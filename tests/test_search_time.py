"""The Table 6 benchmark (experiments.bench.search_time) on the CPU with a tiny DiT: a searched
plan per threshold, records in the main job's layout, and Table 6 built from them (times are not
asserted)."""

import pytest

from analysis.tables import build_tables, load_records
from experiments.infra.app import ConfigError
from experiments.bench.search_time import search_time
from conftest import compose_app

TINY = "models=[{name: tiny_dit, arch: tiny_dit, resolution: 32, steps: 50}]"


def test_table6_from_the_benchmark_runs(tmp_path):
    cfg = compose_app("search_time", [TINY, "thresholds=[raw,d4]", "device=cpu", "dtype=float32",
                                      f"output_dir={tmp_path}"])
    rows = search_time(cfg)  # each row searched by each algorithm, Algorithm 1 first
    assert [(r["threshold_name"], r["plan"]["search_algorithm"]) for r in rows] == [
        ("raw", "greedy"), ("raw", "fast"), ("d4", "greedy"), ("d4", "fast")]
    assert rows[0]["plan"]["flops_fraction"] == rows[1]["plan"]["flops_fraction"] == 1.0  # delta 0: all full
    assert all(r["plan"]["search_seconds"] > 0 and r["raw_latency_s"] > 0 for r in rows)
    # delta 0 tries every strategy at every layer; d4 stops at the first that passes
    assert rows[0]["plan"]["search_raw_generations"] > rows[2]["plan"]["search_raw_generations"] > 1
    assert all(2 <= r["plan"]["search_raw_generations"] <= 3 for r in rows[1::2])  # the fast search's
    assert (tmp_path / "tiny_dit_d4" / "metrics.json").exists() and (tmp_path / "tiny_dit_d4_fast" / "metrics.json").exists()
    table = build_tables(load_records(tmp_path))["table6"]
    assert [cell.text for cell in table.header[0] if cell.text in ("fast", "greedy")] == ["fast", "greedy"]
    cells = {row[2]: row[3:] for row in table.rows}  # the paper's rows, missing ones marked
    assert list(cells) == ["Raw", "D2", "D4", "D6"]
    assert all("–" not in cells[row] for row in ("Raw", "D4"))  # time, generations timed and counted, each search
    assert cells["D2"] == ["–"] * 6


def test_fewer_steps_record_the_50_step_estimate(tmp_path):
    cfg = compose_app("search_time", [TINY.replace("steps: 50", "steps: 3"), "thresholds=[d2]", "algorithms=[greedy]",
                                      "device=cpu", "dtype=float32", f"output_dir={tmp_path}"])
    (row,) = search_time(cfg)
    assert row["solver"] == "dpm_solver_3"
    assert row["estimated_50_step_search_s"] == pytest.approx(row["search_seconds_per_step"] * 49)


@pytest.mark.parametrize("override, message", [
    ("models=[]", "models is empty"),
    (TINY.replace("tiny_dit, resolution", "nope, resolution"), "unknown arch 'nope'"),
    (TINY.replace("steps: 50", "steps: 1"), "steps must be >= 2"),
    ("thresholds=[d2,delta]", "rows are raw or d<k>"),
    ("algorithms=[greedy,slow]", "algorithms holds 'slow'; known: greedy, fast"),
])
def test_bad_settings_are_one_line_errors(tmp_path, override, message):
    cfg = compose_app("search_time", [override, "device=cpu", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        search_time(cfg)
