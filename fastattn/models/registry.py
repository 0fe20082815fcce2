"""Adapters by transformer class; the one place that lists supported architectures."""

from __future__ import annotations

from torch import nn

from .base import DiTAdapter, ModelAdapter
from .opensora import OpenSoraAdapter
from .video import LatteAdapter, WanAdapter
from .mmdit import MMDIT_ADAPTERS

ADAPTERS: dict[str, ModelAdapter] = {
    "DiTTransformer2DModel": DiTAdapter(),
    "PixArtTransformer2DModel": ModelAdapter("PixArtTransformer2DModel", cond_first=False, default_guidance_scale=4.5),
    "LatteTransformer3DModel": LatteAdapter(),
    "WanTransformer3DModel": WanAdapter(),
    "STDiT2": OpenSoraAdapter(),  # Open-Sora 1.1; its interface is checked when used
    **MMDIT_ADAPTERS,  # SD3 and FLUX: joint attention, head-wise (V2) plans
}


def get_adapter(transformer: nn.Module) -> ModelAdapter:
    name = type(transformer).__name__
    if name not in ADAPTERS:
        raise ValueError(f"fastattn has no adapter for {name}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
