"""Image DiTs with a CFG batch: DiT (class-conditional) and PixArt (text-conditional)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ModelAdapter, call_argument, halves_equal, latents_of, order_of_null_half


@dataclass(frozen=True)
class DiTAdapter(ModelAdapter):
    """DiTTransformer2DModel: the class labels say which half of a CFG batch is unconditional
    (the null class, ``num_embeds_ada_norm``), whatever order the caller batched them in."""

    class_name: str = "DiTTransformer2DModel"
    cond_first: bool = True  # DiTPipeline: [conditional, unconditional]

    def cfg_layout(self, transformer: nn.Module, args, kwargs) -> str | None:
        if not halves_equal(latents_of(args, kwargs)):
            return None
        labels = call_argument(transformer, args, kwargs, "class_labels")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] % 2:
            return super().cfg_layout(transformer, args, kwargs)
        # two sets of real labels on equal latents are not a CFG batch: None
        null, half = transformer.config.num_embeds_ada_norm, labels.shape[0] // 2
        return order_of_null_half(bool((labels[:half] == null).all()), bool((labels[half:] == null).all()))


# PixArtSigmaPipeline batches [unconditional, conditional]
PIXART_ADAPTER = ModelAdapter("PixArtTransformer2DModel", cond_first=False)
