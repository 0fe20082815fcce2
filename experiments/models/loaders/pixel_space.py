"""Pieces for diffusion in pixel space with the unmodified DiTPipeline: a VAE that is the identity,
and the small classifier that stands in for the Inception network on the default model."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _Decoded:
    def __init__(self, sample: torch.Tensor):
        self.sample = sample


class IdentityVAE(ModelMixin, ConfigMixin):
    """DiTPipeline decodes latents with ``vae.decode(latents / scaling_factor).sample``; in pixel
    space the latents already are the image (in [-1, 1])."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives the module a device/dtype

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        return _Decoded(latents) if return_dict else (latents,)


class SmallClassifier(ModelMixin, ConfigMixin):
    """A small CNN over [B, 3, H, W] images in [0, 1]: ``features`` (penultimate, for FID-small)
    and ``forward`` (logits, for IS-small and for checking that samples show their class)."""

    @register_to_config
    def __init__(self, num_classes: int = 8, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.GELU(),
            nn.Conv2d(4 * w, feature_dim, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate features as an ``nn.Module`` (what FID feature extractors are)."""

    def __init__(self, classifier: SmallClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)
