"""The video job end to end on tiny Latte and Wan: plan, videos, grids, per-video metrics."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from experiments.video_sample import run_video

ROOT = Path(__file__).resolve().parents[1]


def compose_video(overrides, out_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("video", overrides=[*overrides, "device=cpu"])
    with open_dict(cfg):
        cfg.output_dir = str(out_dir)
    return cfg


@pytest.mark.parametrize("model,frames", [("tiny_latte", 4), ("tiny_wan", 5)])
def test_video_job_writes_videos_grids_and_metrics(tmp_path, model, frames):
    metrics = run_video(compose_video([f"model={model}", "samples.num=1", "num_steps=3", "threshold=d6"], tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["videos"][0]["raw"] == {"video": "000000.gif", "grid": "000000_grid.png"}
    assert (tmp_path / "videos" / "fastattn" / "000000.gif").exists() and (tmp_path / "plan.json").exists()
    assert len(saved["videos"][0]["psnr_per_frame"]) == frames
    assert 0 < metrics["attn_flops_fraction"] <= 1


def test_real_video_configs_compose_and_non_video_models_are_refused(tmp_path):
    for name, family in (("latte_1_512", "latte"), ("wan_1_3b_480p", "wan"), ("opensora_v1_1_240p", "opensora")):
        assert compose_video([f"model={name}"], tmp_path).model.family == family
    with pytest.raises(ValueError, match="model.num_frames: tiny_dit is not a video model config"):
        run_video(compose_video(["model=tiny_dit"], tmp_path))
    with pytest.raises(ValueError, match="search=greedy needs an mrae threshold"):  # the video job's search
        run_video(compose_video(["threshold=rse_0.2"], tmp_path))
    with pytest.raises(ValueError, match="model.window_shape must be one of band, tile, got 'cube'"):
        run_video(compose_video(["model=tiny_wan", "model.window_shape=cube"], tmp_path))
