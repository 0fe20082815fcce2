"""Image-quality metrics for the experiment harness: FID / IS, CLIP score, HPSv2, and PSNR / SSIM / LPIPS of
compressed vs raw samples. Images are [N, H, W, 3], float in [0, 1] or uint8.

Nothing here downloads silently at test time: missing weights raise a one-line RuntimeError naming
what to fetch (FID, IS, CLIP) or, for the optional LPIPS, give None with a warning.
"""

from .clip_score import compute_clip_score, ensure_clip_weights, eval_transform, load_clip, mean_image_text_cosine
from .fid_is import (
    compute_fid,
    compute_inception_score,
    feature_stats,
    fid_from_stats,
    inception_weights_cache_file,
    inception_weights_path,
    load_stats,
    save_stats,
)
from .hpsv2 import compute_hpsv2, hpsv2_checkpoint, load_hpsv2
from .small import SMALL_KEYS, compute_small_metrics, default_classifier, reference_crops, small_reference_stats
from .similarity import compute_lpips, compute_psnr, compute_ssim, lpips_backbone_file

__all__ = [
    "SMALL_KEYS",
    "compute_clip_score",
    "compute_small_metrics",
    "default_classifier",
    "reference_crops",
    "small_reference_stats",
    "ensure_clip_weights",
    "compute_fid",
    "compute_hpsv2",
    "hpsv2_checkpoint",
    "load_hpsv2",
    "mean_image_text_cosine",
    "compute_inception_score",
    "compute_lpips",
    "compute_psnr",
    "compute_ssim",
    "eval_transform",
    "feature_stats",
    "fid_from_stats",
    "inception_weights_cache_file",
    "inception_weights_path",
    "load_clip",
    "load_stats",
    "lpips_backbone_file",
    "save_stats",
]
