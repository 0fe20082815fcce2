"""Stacking with diffusers' block caches (FirstBlockCache, MagCache, PAB, TaylorSeer, FasterCache):
they may skip a layer's attention call at a step. A family that supports them
(:data:`~fastattn.family.BLOCK_CACHES` in its state's ``supports``) is told at each generation
whether one sits on the model (``state.blocks_may_skip``); the counter is unaffected (it counts
transformer calls, not blocks)."""

from __future__ import annotations

from torch import nn

from ..family import BLOCK_CACHES
from .part import Part


def block_cache_installed(transformer: nn.Module) -> bool:
    """Whether diffusers' cache hooks (FirstBlockCache, MagCache, PAB, TaylorSeer, FasterCache)
    sit on a block or layer of the model: they can skip a layer's attention call at a step."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
               for name, m in transformer.named_modules() if name)


class BlockCaches(Part):
    """At each generation, tells a family that supports block caches whether one is on the model."""

    name = "block_caches"

    def reset(self, handle) -> None:
        if BLOCK_CACHES in handle.state.supports:
            handle.state.blocks_may_skip = block_cache_installed(handle.transformer)


__all__ = ["BlockCaches", "block_cache_installed"]
