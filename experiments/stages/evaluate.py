"""The evaluate stage: quality of compressed samples, alone (FID, IS, CLIP) and against the raw
samples of the same seeds (relative error, PSNR, SSIM, LPIPS); and the comparison grid.

Sample folders are read lazily in batches, so the stage scales to the papers' 30k-50k samples;
under torch.distributed every rank measures its share of the images (``metrics/sharded.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..infra import distributed
from ..metrics.folder import ImageFolderArray, list_images

log = logging.getLogger(__name__)


def _unit(images) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float64) / 255 if images.dtype == np.uint8 else images.astype(np.float64)


def mean_relative_error(raw, other, eps: float = 1e-6, batch_size: int = 64) -> float:
    """The search's loss, on pixels in [0, 1]: mean of clip(|a - b| / (max(|a|, |b|) + eps), 0, 10)."""
    total, count = 0.0, 0
    for start in range(0, len(raw), batch_size):
        a, b = _unit(raw[start:start + batch_size]), _unit(other[start:start + batch_size])
        rel = np.abs(a - b) / (np.maximum(np.abs(a), np.abs(b)) + eps)
        total += float(np.clip(rel, 0, 10).sum())
        count += rel.size
    return total / count


def nonfinite_samples(folders: dict[str, Path], indices: Sequence[int]) -> dict[str, int]:
    """Per sample folder with any, how many of ``indices`` came out of the pipeline holding NaN or
    inf (saved black; their manifests say so). Such a run is not scored: two black images would
    match at 100 dB."""
    from .generate import all_manifests

    wanted, counts = {str(i) for i in indices}, {}
    for name, folder in folders.items():
        flagged = {index for manifest in all_manifests(folder).values()
                   for index, entry in manifest["samples"].items() if index in wanted and entry.get("nonfinite")}
        if flagged:
            counts[name] = len(flagged)
    return counts


def reference_images(cfg: DictConfig) -> ImageFolderArray:
    return ImageFolderArray(list_images(cfg.data.reference_dir), size=(cfg.model.resolution, cfg.model.resolution))


# Below these sample counts a metric is indicative only (kept, and flagged): FID's covariance needs
# more samples than its features have dimensions (the Inception's 2048, the built-in classifier's
# 128); IS needs a split's worth of images (IS-small: 128, its split; IS: one per Inception class).
MIN_SAMPLES = {"fid": 2048, "is": 1000, "fid_small": 128, "is_small": 128}


def indicative_only(metrics: dict, num_samples: int) -> list[str]:
    """The metrics of ``metrics`` measured on fewer samples than :data:`MIN_SAMPLES` asks."""
    return [key for key, minimum in MIN_SAMPLES.items() if key in metrics and num_samples < minimum]


def evaluate_samples(cfg: DictConfig, raw: ImageFolderArray | None, compressed: ImageFolderArray,
                     prompts: Sequence[str] | None, device, *, feature_extractor=None, classifier=None) -> dict:
    """Metrics of one run; a metric switched off in ``cfg.metrics`` is absent from the result.

    ``raw`` is None when the run made no raw samples (``samples.compare_raw=false``).
    ``feature_extractor`` / ``classifier`` replace the Inception for FID / IS (None: Inception).
    A bar counts the metrics as they finish; ``indicative_only`` lists those below :data:`MIN_SAMPLES`.
    """
    batch = int(cfg.metrics.feature_batch_size)
    # Listed first and computed one by one after, so the bar knows its total before the slow metrics start.
    steps = paired_metric_steps(cfg, raw, compressed, batch, device) if raw is not None else []
    steps += sample_metric_steps(cfg, compressed, prompts, batch, device, feature_extractor, classifier)
    out = run_metric_steps(steps)
    flagged = indicative_only(out, len(compressed))
    if flagged:
        out["indicative_only"] = flagged
    return out


def paired_metric_steps(cfg: DictConfig, raw: ImageFolderArray, compressed: ImageFolderArray, batch: int,
                        device) -> list[tuple[str, Callable[[], dict]]]:
    """(name, compute) of the metrics that compare each compressed sample with its raw one."""
    from .. import metrics as m
    from ..metrics import sharded

    settings = cfg.metrics
    steps = [("relative error", lambda: {"sample_mean_relative_error": sharded.mean_over_ranks(
        lambda a, b: mean_relative_error(a, b, batch_size=batch), raw, compressed)})]
    if settings.similarity:
        steps.append(("PSNR / SSIM", lambda: {
            "sample_psnr_db": sharded.mean_over_ranks(lambda a, b: m.compute_psnr(a, b, batch_size=batch),
                                                      raw, compressed),
            "ssim": sharded.mean_over_ranks(lambda a, b: m.compute_ssim(a, b, batch_size=batch), raw, compressed)}))
    if settings.lpips:
        steps.append(("LPIPS", lambda: {"lpips": sharded.mean_over_ranks(
            lambda a, b: m.compute_lpips(a, b, device=device), raw, compressed)}))
    return steps


def sample_metric_steps(cfg: DictConfig, compressed: ImageFolderArray, prompts: Sequence[str] | None, batch: int,
                        device, feature_extractor, classifier) -> list[tuple[str, Callable[[], dict]]]:
    """(name, compute) of the metrics of the compressed samples alone."""
    from .. import metrics as m
    from ..metrics import sharded

    settings = cfg.metrics
    steps = []
    if settings.fid:
        def fid() -> dict:
            if cfg.data.reference_stats:
                mu_ref, sigma_ref = m.load_stats(cfg.data.reference_stats)
            else:
                mu_ref, sigma_ref = sharded.sharded_feature_stats(reference_images(cfg), feature_extractor, batch, device)
            mu, sigma = sharded.sharded_feature_stats(compressed, feature_extractor, batch, device)
            return {"fid": m.fid_from_stats(mu_ref, sigma_ref, mu, sigma)}
        steps.append(("FID", fid))
    if settings.inception_score:
        def inception_score() -> dict:
            score, std = sharded.sharded_inception_score(compressed, classifier, min(10, len(compressed)), batch, device)
            return {"is": score, "is_std": std if min(10, len(compressed)) > 1 else None}
        steps.append(("IS", inception_score))
    if small_metrics_apply(cfg):
        steps.append(("FID-small / IS-small", lambda: small_metrics(cfg, compressed)))
    elif small_metrics_wanted(cfg):
        log.info("metrics: FID-small / IS-small skipped: model %s has no shipped classifier", cfg.model.name)
    if settings.clip_score:
        def clip_score() -> dict:
            model, preprocess, tokenizer = m.load_clip(settings.clip_model, settings.clip_pretrained, device=device)
            return {"clip_score": sharded.sharded_clip_score(compressed, list(prompts), model=model,
                                                             preprocess=preprocess, tokenizer=tokenizer, device=device)}
        steps.append(("CLIP score", clip_score))
    if settings.get("hpsv2"):
        def hpsv2() -> dict:
            model, preprocess, tokenizer = m.load_hpsv2(settings.get("hpsv2_checkpoint"), device=device)
            return {"hpsv2": sharded.sharded_hpsv2(compressed, list(prompts), model=model, preprocess=preprocess,
                                                   tokenizer=tokenizer, device=device)}
        steps.append(("HPSv2", hpsv2))
    return steps


def run_metric_steps(steps: list[tuple[str, Callable[[], dict]]]) -> dict:
    """Each step's results merged in order, under a bar (main rank only) naming the one running."""
    out: dict = {}
    with tqdm(total=len(steps), desc="metrics", unit="metric", delay=1.0, disable=not distributed.is_main()) as bar:
        for name, compute in steps:
            bar.set_postfix_str(name)
            out.update(compute())
            bar.update(1)
    return out


def small_metrics_wanted(cfg: DictConfig) -> bool:
    return bool(cfg.metrics.get("fid_small") or cfg.metrics.get("is_small"))


def small_metrics_apply(cfg: DictConfig) -> bool:
    """FID-small / IS-small need the built-in model's classifier: other models skip them (the
    evaluate stage says so)."""
    return small_metrics_wanted(cfg) and cfg.model.get("builtin") == "default"


def small_metrics(cfg: DictConfig, images) -> dict:
    """fid_small / is_small / is_small_std against the seeded real-crop reference set; the std is
    None where there is one split (nothing to spread)."""
    from .. import metrics as m
    from ..metrics.small import is_splits

    settings = cfg.metrics
    classifier = m.default_classifier()
    reference = (m.small_reference_stats(classifier, int(settings.small_reference_num),
                                         int(settings.small_reference_seed), int(cfg.model.resolution))
                 if settings.fid_small else None)
    out = m.compute_small_metrics(images, classifier, reference, fid=bool(settings.fid_small),
                                  inception_score=bool(settings.is_small),
                                  batch_size=int(settings.feature_batch_size))
    if "is_small_std" in out and is_splits(len(images)) == 1:
        out["is_small_std"] = None
    return out


def check_metric_inputs(cfg: DictConfig, custom_features: bool = False) -> None:
    """Fail before any generation when a switched-on metric lacks its data or weights."""
    settings = cfg.metrics
    if settings.fid:
        if not cfg.data.reference_dir and not cfg.data.reference_stats:
            raise ValueError("metrics.fid needs data.reference_dir (real images) or data.reference_stats (.npz)")
        if cfg.data.reference_stats and not Path(cfg.data.reference_stats).is_file():
            raise ValueError(f"data.reference_stats: file not found: {cfg.data.reference_stats}")
        if not cfg.data.reference_stats:
            list_images(cfg.data.reference_dir)  # names a missing or empty folder
    if small_metrics_apply(cfg):
        if settings.fid_small and int(settings.small_reference_num) < 2:
            raise ValueError(f"metrics.small_reference_num: needs at least 2 reference crops, "
                             f"got {settings.small_reference_num}")
        if settings.fid_small and int(cfg.samples.num) < 2:
            raise ValueError(f"metrics.fid_small: needs samples.num >= 2, got {cfg.samples.num}")
        from ..models.loaders.builtin import verify_checksums

        verify_checksums()  # a corrupt or missing classifier fails before any generation
    for key in ("clip_score", "hpsv2"):
        if settings.get(key) and (cfg.model.family == "dit" or cfg.model.get("tiny")):
            raise ValueError(f"metrics.{key} needs text prompts; model {cfg.model.name} has none")
    if settings.clip_score:
        from ..metrics import ensure_clip_weights

        ensure_clip_weights(settings.clip_model, settings.clip_pretrained)
    if settings.get("hpsv2"):
        from ..metrics import hpsv2_checkpoint

        hpsv2_checkpoint(settings.get("hpsv2_checkpoint"))  # one line naming the weights when they are missing
    if (settings.fid or settings.inception_score) and not custom_features:
        from ..metrics import inception_weights_path

        inception_weights_path()  # one-line error naming the weights file when it is missing offline


def comparison_grid(rows: dict, max_columns: int = 8, min_size: int = 128) -> Image.Image:
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
        for c, image in enumerate(images[:n]):
            if image.dtype != np.uint8:
                image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (label_w + c * (cell_w + 2), y))
    return grid
