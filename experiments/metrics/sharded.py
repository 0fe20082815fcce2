"""Metrics of an image set measured by all ranks together: each rank reads and embeds every
world-size-th image, and the shares' partial results combine into what one process would compute
(means weighted by share size, feature moments summed, Inception logits gathered in image order).

In a world of one these are the plain metric functions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..infra import distributed
from .clip_score import compute_clip_score
from .hpsv2 import compute_hpsv2
from .fid_is import (
    _require_samples,
    feature_moments,
    feature_stats,
    inception_logits,
    inception_score_from_logits,
    stats_from_moments,
)
from .folder import ImageFolderArray
from .similarity import ImageArray


def shard(items):
    """This rank's share of an image array or a list (every world-size-th item), None when empty."""
    rank, size = distributed.rank(), distributed.world_size()
    if isinstance(items, ImageFolderArray):  # a new lazy array: slicing the old one would load the images
        files = items.files[rank::size]
        return ImageFolderArray(files, size=items.size) if files else None
    part = items[rank::size]
    return part if len(part) else None


def mean_over_ranks(mean_fn: Callable[..., float | None], *sets) -> float | None:
    """``mean_fn(*sets)``, a mean over items, from each rank's share of ``sets`` (aligned, same length)."""
    if distributed.world_size() == 1:
        return mean_fn(*sets)
    shares = [shard(s) for s in sets]
    count = 0 if shares[0] is None else len(shares[0])
    parts = distributed.all_gather((mean_fn(*shares) if count else None, count))
    if any(mean is None for mean, n in parts if n):  # e.g. LPIPS without its weights
        return None
    return sum(mean * n for mean, n in parts if n) / sum(n for _, n in parts)


def _merge_moments(parts: list) -> tuple:
    """Moments of the union: every part moved to the first part's shift, then added up."""
    parts = [p for p in parts if p[0]]
    _, shift, total_sum, total_outer = parts[0]
    count = parts[0][0]
    for n, own_shift, own_sum, own_outer in parts[1:]:
        d = own_shift - shift  # x - shift = (x - own_shift) + d
        total_sum = total_sum + own_sum + n * d
        total_outer = (total_outer + own_outer + torch.outer(d, own_sum) + torch.outer(own_sum, d)
                       + n * torch.outer(d, d))
        count += n
    return count, shift, total_sum, total_outer


def sharded_feature_stats(images: ImageArray, feature_extractor: nn.Module | None, batch_size: int, device):
    """``feature_stats`` of ``images``, each rank embedding its share."""
    if distributed.world_size() == 1:
        return feature_stats(images, feature_extractor, batch_size, device)
    _require_samples(images, "images", 2)
    share = shard(images)
    moments = feature_moments(share, feature_extractor, batch_size, device) if share is not None else (0, None, 0, 0)
    return stats_from_moments(*_merge_moments(distributed.all_gather(moments)))


def sharded_inception_score(images: ImageArray, classifier: nn.Module | None, splits: int, batch_size: int,
                            device) -> tuple[float, float]:
    """``compute_inception_score`` of ``images``; the logits are gathered back into image order, so the
    seeded split of the score is the single-process one."""
    from .fid_is import compute_inception_score

    size = distributed.world_size()
    if size == 1:
        return compute_inception_score(images, classifier, splits=splits, batch_size=batch_size, device=device)
    if not 1 <= splits <= len(images):
        raise ValueError(f"splits: expected an int in [1, {len(images)}] (the number of images), got {splits!r}")
    share = shard(images)
    parts = distributed.all_gather(None if share is None else inception_logits(share, classifier, batch_size,
                                                                               device).cpu())
    width = next(p.shape[1] for p in parts if p is not None)
    logits = torch.empty(len(images), width, dtype=torch.float64)
    for rank, part in enumerate(parts):
        if part is not None:
            logits[rank::size] = part
    return inception_score_from_logits(logits, splits)


def sharded_hpsv2(images: ImageArray, prompts: Sequence[str], *, model, preprocess, tokenizer, device) -> float:
    """``compute_hpsv2``: a mean over images, from each rank's share."""
    return mean_over_ranks(lambda share, share_prompts: compute_hpsv2(
        share, list(share_prompts), model=model, preprocess=preprocess, tokenizer=tokenizer, device=device),
        images, list(prompts))


def sharded_clip_score(images: ImageArray, prompts: Sequence[str], *, model, preprocess, tokenizer,
                       device) -> float:
    """``compute_clip_score``: unclipped per-share means, averaged, then clipped at 0."""
    def score(share, share_prompts, clip=distributed.world_size() == 1):
        return compute_clip_score(share, list(share_prompts), model=model, preprocess=preprocess,
                                  tokenizer=tokenizer, device=device, clip=clip)

    return max(mean_over_ranks(score, images, list(prompts)), 0.0)
