"""Scale-out: shards, world discovery, and the main job on 2 CPU processes (gloo) against 1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from distributed_job import CRASH_MARKER, ColourLogits, PoolFeatures, check_images, fast_search_config
from experiments.infra import distributed
from experiments.stages.generate import finished, generate
from experiments.metrics.fid_is import compute_inception_score, feature_moments, feature_stats
from experiments.metrics.sharded import _merge_moments
from experiments.infra.conditions import Conditions
from experiments.infra.pipelines import build_pipeline
from experiments.run import run
from experiments.stages.search import distributed_search

ROOT = Path(__file__).resolve().parents[1]
JOB = ["model=tiny_dit", "solver.num_steps=4", "samples.num=7", "samples.batch_size=2", "calibration.num_samples=3",
       "model.tiny.sample_size=8", "model.resolution=8", "model.tiny.num_layers=2", "logger=disabled",
       "metrics.latency.enabled=false", "metrics.fid=true", "metrics.inception_score=true", "threshold=d6"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- world and shards

@pytest.mark.parametrize("n,size", [(7, 2), (8, 3), (2, 5), (0, 2), (5, 1)])
def test_shards_cover_every_index_once(n, size):
    shares = [distributed.shard(range(n), r, size) for r in range(size)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_world_from_torchrun_and_srun_environments():
    assert distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.World(3, 4, 1)
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert distributed.world_from_env(slurm) == distributed.World(5, 8, 1, "gpu07", 20000 + 123456 % 20000)
    batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}  # sbatch's script: one process
    assert distributed.world_from_env(batch_shell) == distributed.World()
    step_of_two = {**slurm, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}  # an srun step smaller than the job
    assert distributed.world_from_env(step_of_two).size == 2
    assert distributed.world_from_env({}) == distributed.World()
    assert [distributed.first_host(s) for s in ("n1", "gpu[03-05,9],cpu1", "a-b[10]")] == ["n1", "gpu03", "a-b10"]


def test_slurm_launcher_runs_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 4
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher.setup


def test_ranks_generating_their_shares_make_the_single_process_images(dit_pipe, tmp_path):
    """And a rank stopped after its first batch does only what it had left on the rerun."""
    from omegaconf import OmegaConf

    conditions = Conditions(OmegaConf.create({"family": "dit", "num_classes": 1000}))
    args = dict(seed=0, num_steps=3, guidance_scale=4.0, batch_size=2, device=torch.device("cpu"))
    indices = list(range(5))
    generate(dit_pipe, conditions, indices, tmp_path / "one", **args)

    class DiesOnSecondBatch:
        calls = 0

        def __call__(self, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("killed")
            return dit_pipe(**kwargs)

    with pytest.raises(RuntimeError, match="killed"):
        generate(DiesOnSecondBatch(), conditions, indices, tmp_path / "two", **args, rank=0, world_size=2)
    assert finished(tmp_path / "two") == {0, 2}
    kept = (tmp_path / "two" / "000000.png").stat().st_mtime_ns
    assert generate(dit_pipe, conditions, indices, tmp_path / "two", **args, rank=1, world_size=2)["generated"] == 2
    assert generate(dit_pipe, conditions, indices, tmp_path / "two", **args, rank=0, world_size=2)["generated"] == 1
    assert (tmp_path / "two" / "000000.png").stat().st_mtime_ns == kept
    assert finished(tmp_path / "two") == set(indices)
    for i in indices:
        name = f"{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                              np.asarray(Image.open(tmp_path / "two" / name))), name


def test_feature_moments_of_shares_merge_to_the_whole_set():
    images = np.random.default_rng(1).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    parts = [feature_moments(images[r::3], PoolFeatures(), 2) for r in range(3)] + [(0, None, 0, 0)]
    merged = _merge_moments(parts)
    from experiments.metrics.fid_is import stats_from_moments

    for got, want in zip(stats_from_moments(*merged), feature_stats(images, PoolFeatures(), 4)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- two processes

def compose_job(out_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*JOB, f"plan_cache_dir={out_dir}/plan_cache",
                                           f"data.reference_dir={out_dir.parent / 'reference'}"])
    cfg.output_dir = str(out_dir)
    return cfg


def test_torchrun_job_equals_one_process_and_a_killed_rank_resumes(tmp_path):
    """Also: collective checks and sharded metrics on the same two ranks, and the benchmark."""
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)):
        Image.fromarray(image).save(reference / f"{i}.png")
    single = run(compose_job(tmp_path / "one"), feature_extractor=PoolFeatures(), classifier=ColourLogits())

    two, marker = tmp_path / "two", tmp_path / "crashed.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "distributed_job.py"),
           *JOB, f"plan_cache_dir={two}/plan_cache", f"data.reference_dir={reference}", f"hydra.run.dir={two}"]
    env = {**os.environ, CRASH_MARKER: str(marker), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) or proc.stderr[-3000:]

    # Rank 1 died after its first batch; on the restart it kept those samples and made the rest.
    before_crash = json.loads(marker.read_text())
    assert len(before_crash) == 2
    assert all(Path(f).stat().st_mtime_ns == mtime for f, mtime in before_crash.items())
    for kind in ("raw", "fastattn"):
        for i in range(7):
            name = f"{i:06d}.png"
            assert (two / "samples" / kind / name).read_bytes() == (tmp_path / "one" / "samples" / kind /
                                                                     name).read_bytes(), f"{kind}/{name}"
    plans = [json.loads((two / f"plan.rank{r}.json").read_text()) for r in range(2)]
    assert plans[0] == plans[1] == json.loads((tmp_path / "one" / "plan.json").read_text())["methods"]
    searched, alone = (json.loads((d / "plan.json").read_text())["search"] for d in (two, tmp_path / "one"))
    assert searched["calibration_ranks"] == 2
    # Shares of 2 and 1 samples: the summed loss is the whole batch's (a mean of the ranks' means is not).
    flat = [(a, b) for row_a, row_b in zip(searched["losses"], alone["losses"]) for a, b in zip(row_a, row_b)]
    assert any(a is not None for a, _ in flat)
    assert all(a == b or a == pytest.approx(b, rel=1e-5) for a, b in flat)
    metrics = [json.loads((two / f"metrics.rank{r}.json").read_text()) for r in range(2)]
    assert metrics[0] == metrics[1] == json.loads((two / "metrics.json").read_text())
    for key in ("sample_mean_relative_error", "sample_psnr_db", "ssim", "fid", "is", "is_std"):
        assert metrics[0][key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
    assert metrics[0]["generated"]["raw"]["ranks"] == 2
    assert proc.stdout.count("attention FLOPs fraction") == 1  # only rank 0 prints

    seen = [json.loads((two / "checks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]  # every rank raises the same error, and gets the same numbers
    assert seen[0]["config"].startswith("rank 1: config differs from rank 0's at samples.num: 4 here, 8 on rank 0")
    assert "is not shared with rank 0" in seen[0]["private_dir"] and seen[0]["shared_dir"] is None
    images, other = check_images()
    assert seen[0]["mean"] == pytest.approx(float(np.abs(images.astype(int) - other).mean()), rel=1e-12)
    for got, want in zip(seen[0]["stats"], feature_stats(images, PoolFeatures(), 2)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    lone = compose_job(tmp_path / "lone")
    lone.calibration.num_samples = 1
    pipe = build_pipeline(lone.model, lone.solver, torch.device("cpu"))
    assert seen[0]["plan_of_one_sample"] == distributed_search(pipe, lone, torch.device("cpu"),
                                                               Conditions(lone.model)).to_dict()["methods"]
    fast = fast_search_config(compose_job(tmp_path / "fast"))
    alone = distributed_search(pipe, fast, torch.device("cpu"), Conditions(fast.model))
    assert seen[0]["fast_plan"] == alone.to_dict()["methods"]
    assert any(x is not None for x in alone.search["step_losses"])
    assert all(a == b or a == pytest.approx(b, rel=1e-5)  # None where a step stayed full
               for a, b in zip(seen[0]["fast_step_losses"], alone.search["step_losses"], strict=True))
    assert seen[0]["is"] == pytest.approx(list(compute_inception_score(images, ColourLogits(), 3, 2)), rel=1e-12)


def test_scaleout_benchmark_runs_as_a_hydra_app_under_torchrun(tmp_path):
    """Each rank composes the same config (out names one folder); rank 0 alone writes and prints."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "experiments.benchmark_scaleout", "shape=tiny",
           "samples_per_gpu=3", "batch_size=2", "steps=2", f"out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((tmp_path / "scaleout.json").read_text())
    assert bench["gpus"] == 2 and bench["one_gpu_images_per_s"] > 0 and bench["all_gpus_images_per_s"] > 0
    assert bench["identical_png_fraction"] == 1.0  # rank 0's share equals its single-GPU images
    assert len(list((tmp_path / "2_gpus").glob("*.png"))) == 6
    assert proc.stdout.count("speed-up") == 1  # rank 0 alone prints
