"""Stacking with block caches: diffusers' hooks (FirstBlockCache, MagCache, PAB, TaylorSeer,
FasterCache) and cache-dit's (DBCache, DBPrune, with or without a calibrator). They may skip a
layer's attention call at a step. A family that supports them
(:data:`~fastattn.family.BLOCK_CACHES` in its state's ``supports``) is told at each generation
whether one sits on the model (``state.blocks_may_skip``); the counter is unaffected (it counts
transformer calls, not blocks)."""

from __future__ import annotations

from torch import nn

from ..family import BLOCK_CACHES
from .part import Part


def diffusers_hooks_installed(transformer: nn.Module) -> bool:
    """Whether diffusers' cache hooks sit on a block or layer of the model."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
               for name, m in transformer.named_modules() if name)


def cache_dit_installed(transformer: nn.Module) -> bool:
    """Whether cache-dit's caching is enabled on the transformer. ``cache_dit.enable_cache`` sets
    ``_is_cached = True`` on the transformer instance (beside its wrapped forward) and
    ``disable_cache`` deletes it; read as an attribute, so cache-dit need not be importable."""
    return transformer.__dict__.get("_is_cached") is True


def block_cache_installed(transformer: nn.Module) -> bool:
    """Whether a block cache sits on the model, diffusers' hooks or cache-dit's: it can skip a
    layer's attention call at a step."""
    return cache_dit_installed(transformer) or diffusers_hooks_installed(transformer)


class BlockCaches(Part):
    """At each generation, tells a family that supports block caches whether one is on the model."""

    name = "block_caches"

    def reset(self, handle) -> None:
        if BLOCK_CACHES in handle.state.supports:
            handle.state.blocks_may_skip = block_cache_installed(handle.transformer)


__all__ = ["BlockCaches", "block_cache_installed", "cache_dit_installed", "diffusers_hooks_installed"]
