"""The evidence command (experiments.evidence + analysis.evidence) on a tiny setting of the built-in model."""

import json

import pytest
from hydra import compose, initialize_config_dir

from analysis.evidence import dominated_singles, fast_against_greedy, interpolate_at, markdown, searches_against_singles
from experiments.evidence import run_evidence
from test_run import ROOT

TINY = ["solver.num_steps=2", "samples.num=4", "samples.batch_size=4", "calibration.num_samples=1",
        "thresholds=[d4]", "single_techniques=[wa]", "single_thresholds=[d4]",
        "metrics.small_reference_num=64", "logger=disabled", "budgets=[]", "fast_thresholds=[]"]


def compose_evidence(overrides, out_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evidence", overrides=[*TINY, f"plan_cache_dir={out_dir}/plan_cache", *overrides])
    cfg.output_dir = str(out_dir)
    return cfg


def test_evidence_command_writes_table_plot_and_record(tmp_path):
    record = run_evidence(compose_evidence([], tmp_path))
    rows = {(r["technique"], r["threshold"]): r for r in record["rows"]}
    assert set(rows) == {("raw", "raw"), ("all", "d4"), ("wa", "d4")}
    assert rows["all", "d4"]["attn_flops_fraction"] < 1 and rows["all", "d4"]["psnr_db"] > 0
    for row in record["rows"]:
        assert row["fid_small"] >= 0 and 1 - 1e-6 <= row["is_small"] <= 8 + 1e-6  # 8 classes bound IS
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert saved["num_samples"] == 4 and len(saved["rows"]) == 3 and saved["complete"]
    table = (tmp_path / "evidence.md").read_text()
    assert "| DiTFastAttn | D4 (δ=0.1) |" in table and "WA (no residual)" in table and "FID-small" in table
    assert (tmp_path / "evidence.png").stat().st_size > 0
    again = run_evidence(compose_evidence([], tmp_path))  # resumes: cached plans, finished samples kept
    assert all(r.get("plan_source", "cache") == "cache" for r in again["rows"])
    assert [r["fid_small"] for r in again["rows"]] == pytest.approx([r["fid_small"] for r in record["rows"]])


def test_evidence_budget_rows_are_measured_and_compared(tmp_path):
    record = run_evidence(compose_evidence(["solver.num_steps=4", "thresholds=[d6]", "single_techniques=[ast]",
                                            "single_thresholds=[d2,d6]", "budgets=[0.6]",
                                            "budget_techniques=[all,all_forecast]", "search.iterations=2"], tmp_path))
    rows = {(r["technique"], r["threshold"]): r for r in record["rows"]}
    for name in ("budget", "budget_forecast"):
        row = rows[name, "b0.6"]
        assert row["budget"] == 0.6 and row["delta"] is None and row["attn_flops_fraction"] <= 0.6
    table = (tmp_path / "evidence.md").read_text()
    assert "**The budget search at matched attention FLOPs**" in table
    assert "| 0.6 | " in table and "Budget search + forecast" in table


@pytest.mark.parametrize("overrides, message", [
    (["single_techniques=[nope]"], "technique: unknown option 'nope'"),
    (["model=tiny_dit"], "need the built-in model"),
    (["metrics=basic"], "needs metrics.fid_small=true"),
    (["single_thresholds=[rse_0.2]"], r"threshold.metric: 'rse' \(threshold rse_0.2\) is a DiTFastAttnV2 budget"),
    (["budgets=[0.2]"], r"search.budget: budget 0.2 is below the least a plan of 2 steps reaches, 0.5"),
    (["budgets=[0.9]", "budget_techniques=[ast]"], "budget_techniques: 'ast' is not one of all, all_forecast, forecast"),
])
def test_evidence_bad_config_is_one_line_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        run_evidence(compose_evidence(overrides, tmp_path))
    assert "\n" not in str(error.value)


def test_matched_flops_interpolates_inside_the_sweep_only():
    sweep = [{"attn_flops_fraction": 0.5, "fid_small": 10.0}, {"attn_flops_fraction": 0.9, "fid_small": 2.0},
             {"attn_flops_fraction": 0.9, "fid_small": 4.0}]  # duplicates average
    assert interpolate_at(sweep, 0.7, "fid_small") == pytest.approx(6.5)
    assert interpolate_at(sweep, 0.4, "fid_small") is None and interpolate_at(sweep, 0.95, "fid_small") is None


def test_markdown_lists_every_row():
    rows = [{"technique": "raw", "threshold": "raw", "delta": None, "attn_flops_fraction": 1.0,
             "fid_small": 5.0, "is_small": 7.0},
            {"technique": "all", "threshold": "d2", "delta": 0.05, "attn_flops_fraction": 0.6, "fid_small": 6.0,
             "is_small": 6.5, "psnr_db": 30.0, "ssim": 0.95},
            {"technique": "ast", "threshold": "d2", "delta": 0.05, "attn_flops_fraction": 0.8, "fid_small": 6.0,
             "is_small": 6.0, "psnr_db": 25.0, "ssim": 0.9},
            {"technique": "forecast", "threshold": "d2", "delta": 0.05, "attn_flops_fraction": 0.6, "fid_small": 5.5,
             "is_small": 6.6, "psnr_db": 31.0, "ssim": 0.96}]
    text = markdown({"model": "small_dit", "solver": "dpm", "num_steps": 50, "guidance_scale": 4.0,
                     "num_samples": 8, "reference_crops": 16, "rows": rows})
    assert "| DiTFastAttn | D2 (δ=0.05) | 0.600 | 6.00 | 6.50 | 30.00 | 0.950 |" in text
    assert "| | | AST only | – | – | – | – |" in text  # 0.6 is outside AST's measured range
    assert "| | | Greedy, forecast + AST | 5.50 | 6.60 | 31.00 | 0.960 |" in text  # compared at matched FLOPs too
    assert "|---|---|---|---|---|---|---|\n" in text


def test_a_search_is_judged_against_every_single_technique_that_reaches_its_flops():
    def row(technique, flops, psnr):
        return {"technique": technique, "threshold": "d2", "delta": 0.05, "attn_flops_fraction": flops,
                "psnr_db": psnr, "fid_small": 30.0}

    rows = [row("ast", 0.2, 24.0), row("ast", 0.4, 30.0), row("wars", 0.65, 28.0), row("wars", 0.7, 29.0),
            row("forecast", 0.3, 28.0), row("forecast", 0.45, 35.0), row("forecast", 0.1, 15.0)]
    verdicts = {v["row"]["attn_flops_fraction"]: v for v in searches_against_singles(rows)}
    assert verdicts[0.3]["against"]["ast"]["psnr_db"] == pytest.approx(27.0) and verdicts[0.3]["beats_all"]
    assert verdicts[0.3]["against"]["wars"]["psnr_db"] is None  # WA-RS's sweep does not reach 0.3
    assert verdicts[0.1]["compared"] == 0 and not verdicts[0.1]["beats_all"]
    # forecast at 0.45 / 35 dB dominates both WA-RS points; neither AST point has a forecast row at
    # no more FLOPs with a higher PSNR
    assert dominated_singles(rows) == {"forecast": (2, 4)}


def test_the_fast_search_is_as_good_as_algorithm_1_at_matched_flops(tmp_path):
    """Issue 28's PSNR bar, at 16 samples on the CPU (the GPU protocol has 256): the built-in model,
    50 steps, each Algorithm-1 row against the fast search's sweep at its FLOPs (or its row at fewer
    FLOPs), PSNR at most 0.5 dB below, for a fraction of the search's cost. (FID-small is reported,
    not asserted: at 16 samples it moves by tens between neighbouring plans.)"""
    record = run_evidence(compose_evidence(["solver.num_steps=50", "samples.num=16", "samples.batch_size=16",
                                            "calibration.num_samples=4", "thresholds=[d2,d4]",
                                            "fast_thresholds=[d2,d3,d4,d5]", "single_techniques=[]"], tmp_path))
    verdicts = fast_against_greedy(record["rows"])
    assert [v["row"]["threshold"] for v in verdicts] == ["d2", "d4"]
    assert all(v["d_psnr_db"] >= -0.5 for v in verdicts), [(v["row"]["threshold"], v["d_psnr_db"]) for v in verdicts]
    assert all(v["d_fid_small"] is not None for v in verdicts)
    rows = {(r["technique"], r["threshold"]): r for r in record["rows"]}
    for t in ("d2", "d4"):
        assert rows["fast", t]["search_raw_generations"] <= 3 < rows["all", t]["search_raw_generations"]
    table = (tmp_path / "evidence.md").read_text()
    assert "**The fast search against Algorithm 1 at matched attention FLOPs**" in table
    assert "rows compared" in table and "| fast | D3 |" in table


def test_a_threshold_may_be_a_delta_past_d6(tmp_path):
    """The fast sweep reaches Algorithm 1's D6 FLOPs only past D6 (its plans keep more FLOPs at one
    delta): a number in a threshold list is the delta itself; one out of [0, 1) is named in one line."""
    from experiments.evidence import FAST, evidence_points, point_config
    from experiments.infra.app import ConfigError

    cfg = compose_evidence(["fast_thresholds=[d6,0.2]"], tmp_path)
    assert (FAST, "0.2") in evidence_points(cfg) and (FAST, "d6") in evidence_points(cfg)
    assert point_config(cfg, FAST, "0.2").threshold.delta == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"a delta must be in \[0, 1\), got 1.5"):
        evidence_points(compose_evidence(["fast_thresholds=[1.5]"], tmp_path))
