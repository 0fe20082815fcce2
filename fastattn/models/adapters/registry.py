"""Adapters by transformer class; the one place that lists supported architectures."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .generic import generic_adapter
from .image import PIXART_ADAPTER, DiTAdapter
from .mmdit import MMDIT_ADAPTERS
from .opensora import OpenSoraAdapter
from .video import LatteAdapter, WanAdapter

KINDS = ("spatial", "temporal", "full3d")  # the window geometries of a layer (ModelAdapter.layer_kinds)

ADAPTERS: dict[str, ModelAdapter] = {
    "DiTTransformer2DModel": DiTAdapter(),
    "PixArtTransformer2DModel": PIXART_ADAPTER,
    "LatteTransformer3DModel": LatteAdapter(),
    "WanTransformer3DModel": WanAdapter(),
    "STDiT2": OpenSoraAdapter(),  # Open-Sora 1.1; its interface is checked when used
    **MMDIT_ADAPTERS,  # SD3 and FLUX: joint attention, head-wise (V2) plans
}


def get_adapter(transformer: nn.Module) -> ModelAdapter:
    """The class's hand-written adapter, else the generic one read from its diffusers attention modules."""
    name = type(transformer).__name__
    adapter = ADAPTERS.get(name) or generic_adapter(transformer)
    if adapter is None:
        raise ValueError(f"fastattn has no adapter for {name} (and it has no diffusers attention modules); "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    return adapter


def layer_kinds(transformer: nn.Module) -> list[str]:
    """The kind of every self-attention layer; 'spatial' for image models."""
    return get_adapter(transformer).layer_kinds(transformer)


def layers_of_kind(transformer: nn.Module, kinds) -> list[int]:
    """Indices of the layers whose kind is in ``kinds`` (any of spatial, temporal, full3d)."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"attention kinds: unknown {unknown} (known: {', '.join(KINDS)})")
    return [i for i, k in enumerate(layer_kinds(transformer)) if k in kinds]
