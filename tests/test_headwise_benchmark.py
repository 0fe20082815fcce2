"""The head-wise benchmark runs end to end on the CPU at a tiny shape (its numbers mean nothing there)."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.benchmark_headwise import layer_sparsity, run, synthetic_row
from fastattn.headwise import LatencyTable, arrow
from fastattn.headwise.methods import CACHE, FULL

ROOT = Path(__file__).resolve().parents[1]


def compose_benchmark(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("benchmark_headwise", overrides=overrides)


@pytest.mark.parametrize("arch,parts,split", [("tiny_flux", "[kernel,step]", 0), ("tiny_sd3", "[kernel,loop,search]", None)])
def test_tiny_benchmark_writes_results_and_a_latency_table(arch, parts, split, tmp_path, capsys):
    import fastattn.kernels.arrow as kernels

    default = kernels.SPLIT_FULL_HEADS_FROM_TOKENS
    cfg = compose_benchmark([f"arch={arch}", "resolution=16", "device=cpu", "dtype=float32", "warmup=0",
                             "repeats=1", f"output_dir={tmp_path}", "e2e_sparsities=[0.5]", f"parts={parts}",
                             f"split_full_heads_from_tokens={'null' if split is None else split}"])
    result = run(cfg)
    saved = json.loads((tmp_path / "benchmark_headwise.json").read_text())
    assert saved["split_full_heads_from_tokens"] == (default if split is None else split)
    assert kernels.SPLIT_FULL_HEADS_FROM_TOKENS == default  # the setting does not outlive the run
    assert saved["image_tokens"] == 64 and len(saved["kernel"]["rows"]) == 9
    if "step" in parts:
        assert len(saved["step"]["rows"]) == 1 and 0 <= result["step"]["attention_share"] <= 1
    if "loop" in parts:  # eager only on a CPU; under CUDA graphs too on a GPU
        (row,) = saved["loop"]["rows"]
        assert row["mode"] == "eager" and row["speedup"] > 0 and 0 <= row["attention_share"] <= 1
        assert saved["kernel"]["residual_refresh"]["relative_latency"] > 0
        assert "arrow+rs:0.015625" in saved["kernel"]["relative_latency"]
    if "search" in parts:
        assert saved["search"]["steps"] == 3 and saved["search"]["search_over_generation"] > 0
    table = LatencyTable.load(tmp_path / "latency_table.json")
    assert table.cost(CACHE, 64, 5) == 0 and table.cost(FULL, 64, 5) == 1
    assert json.loads((tmp_path / "latency_table.json").read_text())["arrow_fraction"] == "each_side"
    assert set(table.measured) == set(saved["kernel"]["relative_latency"])  # read as written
    assert "relative latency per head" in capsys.readouterr().out


def test_bad_benchmark_settings(tmp_path):
    with pytest.raises(ValueError, match="arch: unknown architecture 'sd4'"):
        run(compose_benchmark(["arch=sd4", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="windows"):
        run(compose_benchmark(["arch=tiny_sd3", "windows=[1.5]", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="split_full_heads_from_tokens"):
        run(compose_benchmark(["arch=tiny_sd3", "split_full_heads_from_tokens=-1", f"output_dir={tmp_path}"]))


def test_synthetic_plans_reach_their_sparsity():
    image, text = 4096, 333
    for mode in ("cache", "arrow", "mixed"):
        row = synthetic_row(24, 0.68, mode, 1 / 64, image, text)
        assert layer_sparsity(row, image, text) == pytest.approx(0.68, abs=0.03)
    assert LatencyTable().cost(arrow(0.0625), image, text) < 1


def test_latency_tables_of_whole_band_fractions_are_halved_on_reading(tmp_path):
    # tables without arrow_fraction were measured when arrow:0.125 meant the whole band
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"relative_latency": {"full": 1.0, "arrow:0.125": 0.4, "arrow+rs:2": 0.9}}))
    assert LatencyTable.load(path).measured == {"full": 1.0, "arrow:0.0625": 0.4, "arrow+rs:1": 0.9}
    path.write_text(json.dumps({"arrow_fraction": "each_side", "relative_latency": {"arrow:0.125": 0.4}}))
    assert LatencyTable.load(path).measured == {"arrow:0.125": 0.4}
    path.write_text(json.dumps({"arrow_fraction": "both", "relative_latency": {"arrow:0.125": 0.4}}))
    with pytest.raises(ValueError, match="arrow_fraction must be one of each_side, whole_band, got 'both'"):
        LatencyTable.load(path)
    shipped = LatencyTable.load(ROOT / "experiments" / "latency_tables" / "h100_flux_dev_2048.json")
    assert shipped.cost(arrow(1 / 16), 4096, 512) == 0.383  # measured as arrow:0.125 (the whole band)


def test_printed_table_of_every_part():
    from experiments.benchmark_headwise import format_table

    kernel_rows = [{"head_sparsity": 0.25, "mode": "cache", "attention_sparsity": 0.25, "ms": 9.87654, "speedup": 1.25,
                    "graphed_ms": 9.5, "graphed_speedup": 1.3},
                   {"head_sparsity": 0.75, "mode": "mixed", "attention_sparsity": 0.6789, "ms": 4.321, "speedup": 2.857,
                    "graphed_ms": None, "graphed_speedup": None}]
    step_rows = [{"attention_sparsity": 0.43, "step_ms": 180.0, "speedup": 1.39, "ideal_speedup": 1.35,
                  "ratio_to_ideal": 1.03, "graphed_step_ms": 170.0, "graphed_speedup": 1.45,
                  "graphed_ideal_speedup": 1.5, "graphed_ratio_to_ideal": 0.9667},
                 {"attention_sparsity": 0.68, "step_ms": 150.0, "speedup": 1.67, "ideal_speedup": 1.69,
                  "ratio_to_ideal": 0.988}]
    result = {"arch": "flux_dev", "resolution": 2048, "image_tokens": 16384, "text_tokens": 512, "device": "H100",
              "dtype": "bfloat16",
              "kernel": {"dense_ms": 12.3456, "relative_latency": {"full": 1.0, "cache": 0.0, "arrow:0.0625": 0.2345},
                         "rows": kernel_rows},
              "step": {"raw_step_ms": 250.5, "no_attention_step_ms": 100.25, "attention_share": 0.6, "rows": step_rows},
              "loop": {"steps": 6, "rows": [{"mode": "graphed", "attention_sparsity": 0.43, "attention_share": 0.6,
                                             "loop_ms": 900.0, "raw_ms": 1200.0, "speedup": 1.333,
                                             "ideal_speedup": 1.35, "ratio_to_ideal": 0.9877}]},
              "search": {"steps": 50, "search_s": 70.5, "raw_s": 50.0, "search_over_generation": 1.41}}
    assert format_table(result).splitlines() == [
        "head-wise benchmark | flux_dev 2048px | image 16384 + text 512 tokens | H100 | bfloat16",
        "kernel (one layer, dense 12.346 ms)  relative latency per head: full 1.000, cache 0.000, arrow:0.0625 0.234",
        "head sparsity   mode attn sparsity        ms speed-up",
        "         0.25  cache         0.250     9.877    1.25x  graphed 9.500 ms 1.30x",
        "         0.75  mixed         0.679     4.321    2.86x",
        "step: raw 250.50 ms, without attention 100.25 ms, attention share a = 0.600",
        "sparsity   step ms speed-up   ideal of ideal",
        "   0.430    180.00   1.390x  1.350x  103.0%  graphed 170.00 ms 1.450x of ideal 1.500x (96.7%)",
        "   0.680    150.00   1.670x  1.690x   98.8%",
        "loop of 6 steps (step 0 full), against raw in the same mode:",
        "   mode sparsity     a   loop ms    raw ms speed-up   ideal of ideal",
        "graphed    0.430 0.600     900.0    1200.0   1.333x  1.350x   98.8%",
        "search: 50 steps 70.50 s against 50.00 s raw = 1.41 generations' transformer time",
    ]


def test_tiny_step_benchmark_compiled_on_the_eager_backend(tmp_path):
    """The head-wise step rows once more with the transformer compiled block by block (dynamo's
    eager backend on the CPU); a compile mode it does not know is one line."""
    cfg = compose_benchmark(["arch=tiny_flux", "resolution=16", "device=cpu", "dtype=float32", "warmup=0",
                             "repeats=1", f"output_dir={tmp_path}", "e2e_sparsities=[0.5]", "parts=[step]",
                             "compile=blocks", "compile_backend=eager"])
    result = run(cfg)
    assert len(result["step_compiled"]["rows"]) == 1 and result["step_compiled"]["raw_step_ms"] > 0
    with pytest.raises(ValueError, match="compile: 'max' is not null"):
        run(compose_benchmark(["arch=tiny_sd3", "compile=max", f"output_dir={tmp_path}"]))
