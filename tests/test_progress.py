"""What a run reports while and after it works: bars in samples that move with each denoising
step, the steps actually run in the summary's header, and small-sample metrics marked as such."""

import numpy as np

from conftest import compose_app, dit_inputs
from experiments.stages.evaluate import MIN_SAMPLES, indicative_only, small_metrics
from experiments.infra.progress import step_progress
from experiments.run import format_summary


def test_the_bar_counts_samples_and_moves_with_every_step(dit_pipe):
    seen = []
    with step_progress(dit_pipe, total=3, desc="raw") as progress:
        assert progress.bar.unit == "samples"
        hook = dit_pipe.transformer.register_forward_hook(lambda *_: seen.append(progress.bar.n))
        for batch in (2, 1):  # 3 samples in batches of 2: the bar ends at 3, not at 2 batches
            progress.generation(batch)
            dit_pipe(**dit_inputs(steps=4, n=batch))
        hook.remove()
    assert progress.bar.n == 3
    assert seen == [0, 0.5, 1.0, 1.5, 2, 2.25, 2.5, 2.75]  # each forward sees the steps before it
    assert "step" not in dit_pipe.scheduler.__dict__  # the scheduler is as it was


def summary(**extra):
    metrics = {"model": "small_dit", "scheduler": "dpm_solver", "num_steps": 10, "threshold_name": "d2",
               "threshold": 0.05, "technique": "all", "num_samples": 8, "device": "cpu", "attn_flops_fraction": 0.4,
               "attn_core_flops_fraction": 0.3, "plan": {"counts": {}, "source": "cache"}, "latency_timer": None,
               "fid_small": 58.3, "is_small": 8.0, **extra}
    return format_summary(metrics, out_dir="outputs/run")


def test_the_header_reads_the_steps_run_and_small_samples_are_flagged():
    head = summary().splitlines()[0]
    assert "dpm_solver, 10 steps" in head and "8 samples" in head
    flagged = summary(indicative_only=["fid_small", "is_small"])
    assert "58.30 / 8.00  (n = 8: indicative only)" in flagged and "indicative" not in summary()
    assert indicative_only({"fid_small": 1.0, "is_small": 7.9, "ssim": 0.9, "fid": 3.0}, 8) == ["fid", "fid_small", "is_small"]
    assert indicative_only({"fid_small": 1.0}, MIN_SAMPLES["fid_small"]) == []


def test_one_split_of_is_small_has_no_spread():
    cfg = compose_app("config", ["metrics.small_reference_num=16"])
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    out = small_metrics(cfg, images)
    assert out["is_small_std"] is None and out["is_small"] >= 1 and np.isfinite(out["fid_small"])



def test_cpu_threads_hold_for_the_run_only(tmp_path):
    import torch

    from experiments.run import run
    from test_run import compose_cfg

    before = torch.get_num_threads()
    metrics = run(compose_cfg(["cpu_threads=1", "stages=[search,generate,evaluate]", "device=cpu",
                               "metrics.latency.enabled=false"], tmp_path))
    assert metrics["cpu_threads"] == 1 and torch.get_num_threads() == before
