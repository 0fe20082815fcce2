"""The GPU benchmark's pieces on the CPU: the plan recipe, config checks, and the tiny preset
end to end (timings are not asserted, only that every section runs and writes its records)."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analysis.tables import build_tables, load_records, to_markdown
from fastattn.layerwise.methods import Method
from fastattn.search.recipe import plan_at_fraction

CONF = str(Path(__file__).resolve().parents[1] / "conf" / "benchmark")
PIXART_2K = dict(num_layers=28, num_heads=16, head_dim=72, seq_len=16384, model_dim=1152)


@pytest.mark.parametrize("target", [0.81, 0.46, 0.24])
def test_recipe_hits_the_fraction_from_below_deterministically(target):
    plan = plan_at_fraction(target, 50, PIXART_2K)
    fraction = plan.attention_flops()["fraction"]
    assert target - 0.01 <= fraction <= target
    assert plan.methods[0] == [Method.FULL] * 28
    assert plan == plan_at_fraction(target, 50, PIXART_2K)


def test_recipe_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="must be in"):
        plan_at_fraction(1.5, 50, PIXART_2K)
    with pytest.raises(ValueError, match="below the most compressed plan"):
        plan_at_fraction(0.01, 4, PIXART_2K)
    with pytest.raises(ValueError, match="lacks seq_len"):
        plan_at_fraction(0.5, 50, {"num_layers": 2, "num_heads": 2, "head_dim": 8})


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("tiny", overrides=[f"out_dir={tmp_path}", *overrides])


def test_config_errors_are_one_line(tmp_path):
    from experiments.benchmark import run_benchmark

    with pytest.raises(ValueError, match="unknown \\['flash'\\]"):
        run_benchmark(tiny_cfg(tmp_path, "sections=[flash]"))
    with pytest.raises(ValueError, match="model 'nope' is not defined"):
        run_benchmark(tiny_cfg(tmp_path, "techniques.models=[nope]"))
    with pytest.raises(ValueError, match="end_to_end.cuda_graphs must be a list of booleans"):
        run_benchmark(tiny_cfg(tmp_path, "+end_to_end.cuda_graphs=[eager]"))
    with pytest.raises(ValueError, match="plan_files.tiny_dit_64.mine"):
        run_benchmark(tiny_cfg(tmp_path, "+end_to_end.plan_files.tiny_dit_64.mine=/no/plan.json"))


def test_tiny_benchmark_runs_every_section_and_feeds_table2(tmp_path):
    from experiments.benchmark import run_benchmark, summary_lines

    result = run_benchmark(tiny_cfg(tmp_path, "kernels.repeats=1", "techniques.repeats=1"))
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["kernels"]["rows"] and saved["techniques"] and saved["end_to_end"]
    kinds = {(r["kernel"], r["shape"]) for r in saved["kernels"]["rows"]}
    assert {("window", "band"), ("window", "tile"), ("refresh", "band")} <= kinds
    plans = {r["plan"] for r in saved["end_to_end"]}
    assert plans == {"raw", "recipe_0.6"}
    assert all(r["timer"] == "wall_clock" for r in saved["end_to_end"])
    assert summary_lines(result)
    table2 = build_tables(load_records(tmp_path))["table2"]
    text = to_markdown(table2)
    assert "tiny_dit_64" in text.lower() or "Tiny" in text or "64" in text
    assert len(table2.rows) == 4  # two models x (FLOPs, latency)


def test_end_to_end_compiled_rows_on_the_eager_backend(tmp_path):
    """The benchmark's torch.compile path (end_to_end.compile) on a tiny PixArt with dynamo's
    eager backend: raw and the plan, compiled whole, beside the uncompiled rows; a compile mode it does not know is one line."""
    from experiments.benchmark import run_benchmark

    cfg = tiny_cfg(tmp_path, "sections=[end_to_end]", "end_to_end.fractions={tiny_pixart_64: [0.6]}",
                   "end_to_end.compile=[null,whole]", "end_to_end.steps=3")
    rows = run_benchmark(cfg)["end_to_end"]
    assert {(r["compile"], r["plan"]) for r in rows} == {(c, p) for c in (None, "whole") for p in ("raw", "recipe_0.6")}
    # compiled rows time no attention (hooks would recompile); a comes from the loop without attention
    assert all((r["attention_ms"] is None) == (r["compile"] is not None) for r in rows)
    assert all(r["attention_share_source"] == "no_attention_plan" for r in rows if r["plan"] == "raw" and r["compile"])
    assert all(r["loop_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="end_to_end.compile: 'max' is not null"):
        run_benchmark(tiny_cfg(tmp_path, "end_to_end.compile=[max]"))
