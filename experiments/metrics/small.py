"""FID-small and IS-small: FID and Inception Score of the built-in default model's samples, measured
with the shipped SmallClassifier (128-d penultimate features, 8 logits) instead of the Inception.

The numbers are only comparable with each other (same classifier, same reference set, same sample
count); never with Inception FID / IS. The reference set is real crops of the photographs the model
was trained on, drawn at run time from a seed (class-balanced, uniform positions, random flips), so
nothing is downloaded or shipped and the set is the same on every machine.
"""

from __future__ import annotations

import numpy as np
import torch

from .fid_is import compute_inception_score, feature_stats, fid_from_stats
from .similarity import ImageArray, check_images

SMALL_KEYS = ("fid_small", "is_small", "is_small_std")
IS_SPLIT_MIN = 128  # images per IS-small split


def reference_crops(num: int, seed: int, size: int = 32) -> np.ndarray:
    """``num`` real crops [N, size, size, 3] uint8, class-balanced over the training photographs."""
    from ..infra.photo_crops import load_photos

    if not isinstance(num, int) or num < 2:
        raise ValueError(f"reference num: expected an int >= 2, got {num!r}")
    photos = load_photos()
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(num):
        photo = photos[i % len(photos)]
        top = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=g))
        crop = photo[:, top:top + size, left:left + size]
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        crops.append(crop)
    images = (torch.stack(crops).permute(0, 2, 3, 1) + 1) / 2
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def default_classifier():
    """The shipped classifier (hash-checked), for the default model only."""
    from ..models.loaders.builtin import load_default_classifier

    return load_default_classifier()


def classifier_features(classifier) -> torch.nn.Module:
    from ..models.loaders.pixel_space import ClassifierFeatures

    return ClassifierFeatures(classifier).eval()


def small_reference_stats(classifier, num: int, seed: int, size: int = 32,
                          batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the classifier features of the seeded real-crop reference set."""
    return feature_stats(reference_crops(num, seed, size), classifier_features(classifier), batch_size)


def is_splits(num_images: int) -> int:
    """Splits of at least IS_SPLIT_MIN images, at most 10: each split's marginal p(y) over 8 classes
    needs many images, and a split of n images cannot score above n (10 splits of 64 would)."""
    return max(1, min(10, num_images // IS_SPLIT_MIN))


def compute_small_metrics(images: ImageArray, classifier, reference: tuple[np.ndarray, np.ndarray], *,
                          fid: bool = True, inception_score: bool = True, batch_size: int = 64) -> dict:
    """{"fid_small", "is_small", "is_small_std"} of ``images`` (those switched on)."""
    check_images(images, "images")
    out: dict = {}
    if fid:
        if len(images) < 2:
            raise ValueError(f"images: FID-small needs at least 2 images, got {len(images)}")
        mu, sigma = feature_stats(images, classifier_features(classifier), batch_size)
        out["fid_small"] = fid_from_stats(*reference, mu, sigma)
    if inception_score:
        out["is_small"], out["is_small_std"] = compute_inception_score(
            images, classifier.eval(), splits=is_splits(len(images)), batch_size=batch_size)
    return out
