"""Video samples on disk (GIF, or MP4 when imageio is installed, plus a frame grid) and per-video
metrics: PSNR and SSIM of every frame against the raw video of the same seed, CLIP score on frames.

A video is [frames, height, width, 3], float in [0, 1] (what pipelines give with
``output_type="np"``) or uint8. Files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from fastattn.utils.io import atomic_save_image, atomic_write_bytes

FORMATS = ("gif", "mp4")


def check_video(video, name: str = "video") -> np.ndarray:
    """The video as uint8 [F, H, W, 3]; a one-line error naming what is wrong otherwise."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or 0 in video.shape:
        raise ValueError(f"{name}: expected [frames, height, width, 3], got shape {tuple(video.shape)}")
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"{name}: expected float in [0, 1] or uint8, got {video.dtype}")
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


def frame_grid(video, cols: int | None = None) -> np.ndarray:
    """All frames tiled row by row into one image (``cols`` frames per row; default ~square)."""
    frames = check_video(video)
    n, h, w, _ = frames.shape
    cols = cols or math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    return grid


def _gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def _mp4_bytes(frames: np.ndarray, fps: float) -> bytes:
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401  the ffmpeg binary imageio's FFMPEG plugin writes MP4 with
    except ImportError:
        raise ValueError("video format mp4 needs imageio with its ffmpeg plugin (pip install 'fastattn[video]'); "
                         "use gif otherwise") from None
    fd, tmp = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264")
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_video(video, path: str | os.PathLike, fps: float = 8) -> Path:
    """Write ``video`` as GIF or MP4, chosen by the file suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unknown video format {fmt!r} (known: {', '.join(FORMATS)})")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = check_video(video)
    return atomic_write_bytes(path, _gif_bytes(frames, fps) if fmt == "gif" else _mp4_bytes(frames, fps))


def save_video_sample(video, folder: str | os.PathLike, name: str, fmt: str = "gif", fps: float = 8) -> dict:
    """``folder/name.{fmt}`` and ``folder/name_grid.png``; returns the file names."""
    folder = Path(folder)
    save_video(video, folder / f"{name}.{fmt}", fps)
    atomic_save_image(folder / f"{name}_grid.png", Image.fromarray(frame_grid(video)))
    return {"video": f"{name}.{fmt}", "grid": f"{name}_grid.png"}


def video_similarity(raw, compressed) -> dict:
    """PSNR (dB) and SSIM of each frame of ``compressed`` against the same frame of ``raw``."""
    from ..metrics.similarity import compute_psnr, compute_ssim

    raw, compressed = check_video(raw, "raw"), check_video(compressed, "compressed")
    if raw.shape != compressed.shape:
        raise ValueError(f"compressed: shape {compressed.shape} differs from raw {raw.shape}")
    psnr = [compute_psnr(raw[i:i + 1], compressed[i:i + 1]) for i in range(len(raw))]
    ssim = [compute_ssim(raw[i:i + 1], compressed[i:i + 1]) for i in range(len(raw))]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_per_frame": psnr, "ssim_per_frame": ssim}


def video_clip_score(video, prompt: str, scorer: Callable[[np.ndarray, Sequence[str]], float] | None = None,
                     **clip_kwargs) -> float:
    """CLIP score of the video's frames against its prompt, averaged over frames."""
    if scorer is None:
        from ..metrics.clip_score import compute_clip_score

        def scorer(frames, prompts):
            return compute_clip_score(frames, prompts, **clip_kwargs)

    frames = check_video(video)
    return float(scorer(frames, [prompt] * len(frames)))
