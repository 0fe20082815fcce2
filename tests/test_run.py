"""The main job through Hydra: config composition, validation, outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from experiments.infra.app import ConfigError
from experiments.infra.config import validate_config
from experiments.run import run
from fastattn import CompressionPlan

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["solver.num_steps=5", "samples.num=3", "samples.batch_size=2", "calibration.num_samples=1",
         "model.tiny.sample_size=8", "model.resolution=8", "model.tiny.num_layers=2", "logger=disabled",
         "metrics.latency.repeats=1", "metrics.latency.warmup=0", "metrics.latency.batch_size=1"]


def compose_cfg(overrides, out_dir):
    model = [o for o in overrides if o.startswith("model=")] or ["model=tiny_dit"]
    rest = [o for o in overrides if not o.startswith("model=")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*model, *SMALL, f"plan_cache_dir={out_dir}/plan_cache", *rest])
    cfg.output_dir = str(out_dir)
    return cfg


@pytest.mark.parametrize("model", ["tiny_dit", "tiny_pixart"])
def test_main_job_writes_plan_grid_and_metrics(tmp_path, model):
    metrics = run(compose_cfg([f"model={model}", "threshold=d6"], tmp_path))
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert (plan.num_steps, plan.num_layers) == (5, 2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("attn_flops_fraction", "sample_mean_relative_error", "sample_psnr_db", "ssim", "raw_latency_s",
                "latency_s", "attn_latency_s", "raw_attn_latency_s"):
        assert saved[key] == metrics[key] and saved[key] is not None, key
    assert saved["latency_timer"] == ("cuda_events" if torch.cuda.is_available() else "wall_clock") and saved["attn_latency_s"] < saved["latency_s"]
    assert saved["versions"]["torch"] == torch.__version__ and saved["plan"]["search_seconds"] > 0
    assert saved["plan"]["search_algorithm"] == "greedy" and saved["plan"]["search_raw_generations"] > 1
    assert (tmp_path / "plan_heatmap.png").exists()
    assert saved["attn_flops_fraction"] == pytest.approx(plan.attention_flops()["fraction"])
    assert 0 < saved["attn_flops_fraction"] <= 1.1 and saved["num_samples"] == 3
    grid = Image.open(tmp_path / "samples_grid.png")
    assert grid.height > 2 * 8  # two rows: raw and compressed
    for kind in ("raw", "fastattn"):
        assert sorted(p.name for p in (tmp_path / "samples" / kind).glob("*.png")) == [
            "000000.png", "000001.png", "000002.png"]
    assert metrics["plan"]["source"] == "search" and saved["kind"] == "run" and saved["threshold_name"] == "d6"


def test_rerun_resumes_and_reuses_the_cached_plan(tmp_path):
    first = run(compose_cfg([], tmp_path))
    raw_dir = tmp_path / "samples" / "raw"
    (raw_dir / "000001.png").unlink()  # as if interrupted before sample 1 was written
    kept = (raw_dir / "000000.png").stat().st_mtime_ns
    second = run(compose_cfg([], tmp_path))
    assert second["plan"]["source"] == "cache"
    raw = second["generated"]["raw"]
    assert {k: raw[k] for k in ("generated", "skipped", "total_generated")} == {"generated": 1, "skipped": 2,
                                                                               "total_generated": 3}
    assert raw["total_seconds"] > raw["seconds"] > 0  # the earlier run's seconds are kept
    assert second["generated"]["fastattn"]["generated"] == 0
    assert (raw_dir / "000000.png").stat().st_mtime_ns == kept  # finished samples are not redone
    assert second["sample_psnr_db"] == first["sample_psnr_db"]  # the regenerated sample is the same image
    third = run(compose_cfg(["threshold=d3"], tmp_path / "other"))
    assert third["plan"]["source"] == "search"  # another threshold is another plan


def test_given_plan_file_is_used_and_checked(tmp_path):
    run(compose_cfg([], tmp_path / "a"))
    plan_file = tmp_path / "a" / "plan.json"
    metrics = run(compose_cfg([f"plan_path={plan_file}"], tmp_path / "b"))
    assert metrics["plan"]["source"] == "file"
    with pytest.raises(ValueError, match="plan has 5 steps"):
        run(compose_cfg([f"plan_path={plan_file}", "solver.num_steps=7"], tmp_path / "c"))
    assert not (tmp_path / "c" / "samples").exists()


def test_raw_threshold_gives_identical_samples(tmp_path):
    metrics = run(compose_cfg(["threshold=raw"], tmp_path))
    assert metrics["attn_flops_fraction"] == pytest.approx(1.0)
    assert metrics["sample_mean_relative_error"] == 0 and metrics["sample_psnr_db"] == 100.0


def test_cuda_graphs_on_a_cpu_run_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs=true needs a CUDA device"):
        validate_config(compose_cfg(["device=cpu", "cuda_graphs=true"], tmp_path))


@pytest.mark.parametrize("override,match", [
    ("threshold.delta=-0.1", "threshold.delta must be >= 0"),
    ("window_size=3", r"window_size must be in \(0, 1\]"),
    ("solver.num_steps=0", "solver.num_steps must be an integer >= 1"),
    ("samples.batch_size=0", "samples.batch_size must be"),
    ("model.family=unet", "model.family must be one of"),
    ("model.dtype=float8", "model.dtype: unknown dtype"),
    ("technique.strategies=[ast,fast]", "strategies: unknown method 'fast'"),
    ("solver.scheduler=euler", "solver.scheduler must be one of"),
    ("device=tpu", "device must be auto, cpu or cuda"),
    ("cuda_graphs=yes", "cuda_graphs must be true or false"),
    ("plan_path=/nonexistent/plan.json", "plan_path: file not found: /nonexistent/plan.json"),
])
def test_bad_config_values_fail_before_work(tmp_path, override, match):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ConfigError, match=match):  # a ValueError, printed by Hydra as its one line
        validate_config(cfg)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "plan.json").exists()


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", "model=tiny_dit", *SMALL, "samples.warmup=false", f"hydra.run.dir={out}",
           "plan_cache_dir=null"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention FLOPs fraction" in proc.stdout
    head = next(line for line in proc.stdout.splitlines() if line.startswith("fastattn |"))
    assert "| dpm_solver, 5 steps |" in head  # the steps run, not the solver file's 50
    assert {"plan.json", "metrics.json", "samples_grid.png"} <= {p.name for p in out.iterdir()}
    assert (out / "run.log").exists()  # Hydra names the job after its module, not the shared scaffold


def test_command_line_config_error_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", "model=tiny_dit", "threshold.delta=-1", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "threshold.delta must be >= 0, got -1.0" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
