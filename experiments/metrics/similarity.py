"""Compressed vs raw samples of the same seeds: PSNR, SSIM and (when its weights are cached) LPIPS.

Also home of the image-input helpers the other metric modules share: every metric takes
images as [N, H, W, 3], float in [0, 1] (what the pipelines produce) or uint8.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch

from .folder import ImageFolderArray

logger = logging.getLogger(__name__)

ImageArray = Union[np.ndarray, torch.Tensor, ImageFolderArray]
MAX_PSNR_DB = 100.0  # identical images: report this instead of infinity (JSON has no inf)

# LPIPS backbone -> torchvision weights enum; torchmetrics builds the backbone with `weights=<enum>.DEFAULT`,
# which torch.hub caches under <hub dir>/checkpoints by the URL's file name.
_LPIPS_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_SSIM_MIN_SIDE = 6  # torchmetrics' 11-px Gaussian window reflect-pads by 5, which needs sides > 5


# ---------------------------------------------------------------- image inputs (shared by all metrics)

def check_images(images: ImageArray, name: str) -> None:
    """Raise a one-line ValueError naming ``name`` unless ``images`` is [N, H, W, 3] uint8 or float."""
    if not isinstance(images, (np.ndarray, torch.Tensor, ImageFolderArray)):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name}: expected images of shape [N, H, W, 3] with N >= 1, got {tuple(images.shape)}")
    dtype = torch.as_tensor(images[:1]).dtype
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"{name}: expected uint8 or float images, got dtype {dtype}")


def to_float_nchw(images: ImageArray, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, H, W, 3] uint8 or float in [0, 1] -> [N, 3, H, W] float in [0, 1] (on the CPU)."""
    check_images(images, name)
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch warns on read-only arrays (memmaps, broadcasts)
    tensor = torch.as_tensor(images).detach().cpu()
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(dtype) / 255
    else:
        low, high = float(tensor.min()), float(tensor.max())
        if not (0 <= low and high <= 1):  # written so that NaN fails too
            raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        tensor = tensor.to(dtype)
    return tensor.permute(0, 3, 1, 2).contiguous()


def to_uint8(images_nchw: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8, rounding: PNG samples loaded as k/255 come back as exactly k
    (torchmetrics' own `(x * 255).byte()` truncates, turning some k into k - 1)."""
    return (images_nchw * 255).round().clamp(0, 255).to(torch.uint8)


def iter_batches(images: ImageArray, name: str, batch_size: int,
                 dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Float [B, 3, H, W] batches, converted one at a time so a large set never sits in memory as floats."""
    check_images(images, name)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield to_float_nchw(images[start:start + batch_size], name, dtype)


def _check_pair(raw: ImageArray, compressed: ImageArray) -> None:
    check_images(raw, "raw")
    check_images(compressed, "compressed")
    if tuple(raw.shape) != tuple(compressed.shape):
        raise ValueError(f"compressed: shape {tuple(compressed.shape)} differs from raw {tuple(raw.shape)}")


def _pairs(raw: ImageArray, compressed: ImageArray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Aligned float64 batches; float64 so a tiny MSE of near-identical samples keeps its digits."""
    _check_pair(raw, compressed)
    return zip(iter_batches(raw, "raw", batch_size, torch.float64),
               iter_batches(compressed, "compressed", batch_size, torch.float64), strict=True)


# ---------------------------------------------------------------- PSNR / SSIM

def compute_psnr(raw: ImageArray, compressed: ImageArray, max_db: float = MAX_PSNR_DB,
                 batch_size: int = 64) -> float:
    """Mean over images of each image's PSNR (dB, data range 1), each capped at ``max_db``:
    identical images have infinite PSNR and JSON has no inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    per_image = [
        peak_signal_noise_ratio(c, r, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=max_db)
        for r, c in _pairs(raw, compressed, batch_size)
    ]
    return float(torch.cat(per_image).mean())


def compute_ssim(raw: ImageArray, compressed: ImageArray, batch_size: int = 64) -> float:
    """Mean over images of each image's SSIM (torchmetrics defaults: 11-px Gaussian window, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(raw, compressed)
    height, width = raw.shape[1:3]
    if min(height, width) < _SSIM_MIN_SIDE:
        raise ValueError(f"raw: SSIM needs images of at least {_SSIM_MIN_SIDE}x{_SSIM_MIN_SIDE}, got {height}x{width}")
    per_image = [
        structural_similarity_index_measure(c, r, data_range=1.0, reduction="none")
        for r, c in _pairs(raw, compressed, batch_size)
    ]
    return float(torch.cat(per_image).mean())


# ---------------------------------------------------------------- LPIPS

def lpips_backbone_file(net_type: str = "alex") -> Path:
    """Where torch.hub keeps the torchvision backbone weights LPIPS ``net_type`` needs."""
    if net_type not in _LPIPS_BACKBONE_WEIGHTS:
        raise ValueError(f"net_type: unknown LPIPS backbone {net_type!r} (known: {', '.join(_LPIPS_BACKBONE_WEIGHTS)})")
    import torchvision

    url = getattr(torchvision.models, _LPIPS_BACKBONE_WEIGHTS[net_type]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def compute_lpips(raw: ImageArray, compressed: ImageArray, net_type: str = "alex", batch_size: int = 16,
                  device: str | torch.device = "cpu") -> float | None:
    """Mean LPIPS over image pairs, or None (with a warning) when the backbone weights are not cached:
    LPIPS is an optional extra and must never trigger a download."""
    weights = lpips_backbone_file(net_type)
    if not weights.is_file():
        logger.warning("LPIPS skipped: torchvision %s weights not cached at %s", net_type, weights)
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    # sync off: under torch.distributed each rank measures its own pairs (the caller combines them)
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True, sync_on_compute=False).to(device)
    with torch.no_grad():
        for r, c in _pairs(raw, compressed, batch_size):
            metric.update(c.float().to(device), r.float().to(device))  # mean reduction = mean of per-pair values
    return float(metric.compute())
