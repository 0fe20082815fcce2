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


@pytest.mark.parametrize("arch,parts,split", [("tiny_flux", "[kernel,step]", 0), ("tiny_sd3", "[kernel,search]", None)])
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
    if "search" in parts:
        assert saved["search"]["steps"] == 3 and saved["search"]["search_over_generation"] > 0
    table = LatencyTable.load(tmp_path / "latency_table.json")
    assert table.cost(CACHE, 64, 5) == 0 and table.cost(FULL, 64, 5) == 1
    assert "relative latency per head" in capsys.readouterr().out


def test_bad_benchmark_settings(tmp_path):
    with pytest.raises(ValueError, match="arch: unknown architecture 'sd4'"):
        run(compose_benchmark(["arch=sd4", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="windows"):
        run(compose_benchmark(["arch=tiny_sd3", "windows=[3.0]", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="split_full_heads_from_tokens"):
        run(compose_benchmark(["arch=tiny_sd3", "split_full_heads_from_tokens=-1", f"output_dir={tmp_path}"]))


def test_synthetic_plans_reach_their_sparsity():
    image, text = 4096, 333
    for mode in ("cache", "arrow", "mixed"):
        row = synthetic_row(24, 0.68, mode, 1 / 32, image, text)
        assert layer_sparsity(row, image, text) == pytest.approx(0.68, abs=0.03)
    assert LatencyTable().cost(arrow(0.125), image, text) < 1
