"""Comparisons of compressed samples with raw samples of the same seeds, and the image grid."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

MAX_PSNR_DB = 100.0  # identical images: report this instead of infinity (JSON has no inf)


def psnr(raw: np.ndarray, other: np.ndarray) -> float:
    """Mean over images of the PSNR in dB, for images in [0, 1]."""
    mse = ((raw.astype(np.float64) - other.astype(np.float64)) ** 2).reshape(len(raw), -1).mean(axis=1)
    values = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)), MAX_PSNR_DB)
    return float(np.minimum(values, MAX_PSNR_DB).mean())


def mean_relative_error(raw: np.ndarray, other: np.ndarray, eps: float = 1e-6) -> float:
    """The search's loss, on pixels: mean of clip(|a - b| / (max(|a|, |b|) + eps), 0, 10)."""
    a, b = raw.astype(np.float64), other.astype(np.float64)
    rel = np.abs(a - b) / (np.maximum(np.abs(a), np.abs(b)) + eps)
    return float(np.clip(rel, 0, 10).mean())


def comparison_grid(rows: dict[str, np.ndarray], max_columns: int = 8, min_size: int = 128) -> Image.Image:
    """One labelled row of images per entry (e.g. raw, fastattn), same sample in each column."""
    label_w = 90
    first = next(iter(rows.values()))
    n = min(max_columns, len(first))
    h, w = first.shape[1:3]
    scale = max(1, min_size // max(h, w))  # tiny models make tiny images: enlarge, nearest
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new("RGB", (label_w + n * (cell_w + 2), len(rows) * (cell_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (cell_h + 2)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c in range(n):
            tile = Image.fromarray((np.clip(images[c], 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + c * (cell_w + 2), y))
    return grid
