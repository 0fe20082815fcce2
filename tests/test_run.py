"""The main job through Hydra: config composition, validation, outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from experiments.config import validate_config
from experiments.run import run
from fastattn import CompressionPlan

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["solver.num_steps=5", "samples.num=3", "samples.batch_size=2", "calibration.num_samples=1",
         "model.tiny.sample_size=8", "model.resolution=8", "model.tiny.num_layers=2"]


def compose_cfg(overrides, out_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, *overrides])
    cfg.output_dir = str(out_dir)
    return cfg


@pytest.mark.parametrize("model", ["tiny_dit", "tiny_pixart"])
def test_main_job_writes_plan_grid_and_metrics(tmp_path, model):
    metrics = run(compose_cfg([f"model={model}", "threshold=d6"], tmp_path))
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert (plan.num_steps, plan.num_layers) == (5, 2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("attn_flops_fraction", "sample_mean_relative_error", "sample_psnr_db", "seconds_per_sample_raw",
                "seconds_per_sample_compressed", "search_seconds"):
        assert saved[key] == metrics[key]
    assert saved["attn_flops_fraction"] == pytest.approx(plan.attention_flops()["fraction"])
    assert 0 < saved["attn_flops_fraction"] <= 1.1 and saved["num_samples"] == 3
    grid = Image.open(tmp_path / "samples_grid.png")
    assert grid.height > 2 * 8  # two rows: raw and compressed


def test_raw_threshold_gives_identical_samples(tmp_path):
    metrics = run(compose_cfg(["threshold=raw"], tmp_path))
    assert metrics["attn_flops_fraction"] == pytest.approx(1.0)
    assert metrics["sample_mean_relative_error"] == 0 and metrics["sample_psnr_db"] == 100.0


@pytest.mark.parametrize("override,match", [
    ("threshold.delta=-0.1", "threshold.delta must be >= 0"),
    ("window_fraction=3", r"window_fraction must be in \(0, 2\]"),
    ("solver.num_steps=0", "solver.num_steps must be an integer >= 1"),
    ("samples.batch_size=0", "samples.batch_size must be"),
    ("model.family=unet", "model.family must be one of"),
    ("model.dtype=float8", "model.dtype: unknown dtype"),
    ("technique.strategies=[ast,fast]", "strategies: unknown method 'fast'"),
    ("solver.scheduler=euler", "solver.scheduler must be one of"),
    ("device=tpu", "device must be auto, cpu or cuda"),
])
def test_bad_config_values_fail_before_work(tmp_path, override, match):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "plan.json").exists()


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", *SMALL, "samples.warmup=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention FLOPs fraction" in proc.stdout
    assert {"plan.json", "metrics.json", "samples_grid.png"} <= {p.name for p in out.iterdir()}
