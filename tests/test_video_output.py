"""Video samples on disk (GIF + frame grid; MP4 with imageio) and per-video metrics."""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from experiments.stages.video_output import frame_grid, save_video, save_video_sample, video_clip_score, video_similarity


def video(seed=0, frames=5, side=16):
    return np.random.default_rng(seed).random((frames, side, side, 3), dtype=np.float32)


def test_gif_and_grid_hold_every_frame(tmp_path):
    v = video()
    files = save_video_sample(v, tmp_path, "000003", fmt="gif", fps=4)
    gif = Image.open(tmp_path / files["video"])
    assert gif.n_frames == 5 and gif.size == (16, 16) and gif.info["duration"] == 250
    grid = np.asarray(Image.open(tmp_path / files["grid"]))
    assert grid.shape == (32, 48, 3)  # 5 frames, 3 per row
    assert np.array_equal(grid[16:32, 16:32], frame_grid(v)[16:32, 16:32])
    assert np.array_equal(frame_grid(v)[16:32, 16:32], (v[4] * 255).round().astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.gif", "000003_grid.png"]  # no temp files


def test_bad_videos_and_formats_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"video: expected \[frames, height, width, 3\], got shape \(16, 16, 3\)"):
        save_video(video()[0], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="unknown video format 'avi'"):
        save_video(video(), tmp_path / "a.avi")
    with pytest.raises(ValueError, match=r"compressed: shape .* differs from raw"):
        video_similarity(video(), video(frames=4))


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None, reason="imageio-ffmpeg installed")
def test_mp4_without_imageio_says_what_to_install(tmp_path):
    with pytest.raises(ValueError, match=r"fastattn\[video\]"):
        save_video(video(), tmp_path / "a.mp4")
    assert not list(tmp_path.iterdir())


def test_per_frame_similarity_and_clip_on_frames():
    raw = video()
    noisy = raw.copy()
    noisy[2] = np.clip(noisy[2] + 0.1, 0, 1)
    m = video_similarity(raw, noisy)
    assert m["psnr_per_frame"][0] == 100.0 and m["psnr_per_frame"][2] < 30
    assert m["ssim_per_frame"][1] == pytest.approx(1.0) and m["ssim_per_frame"][2] < 1
    assert m["psnr"] == pytest.approx(np.mean(m["psnr_per_frame"]))
    seen = {}

    def scorer(frames, prompts):
        seen.update(n=len(frames), prompts=set(prompts))
        return 31.5

    assert video_clip_score(raw, "a cat", scorer=scorer) == 31.5
    assert seen == {"n": 5, "prompts": {"a cat"}}
