"""What the handle's parts ask about diffusers' offloading. Group offloading moves weights during
each forward (no CUDA graphs then); model CPU offloading moves the transformer between
generations (:class:`~fastattn.cuda_graphs.StepGraphs` sees its weights move and captures again);
an offloading wrapper installed over fastattn's ``forward`` keeps it beneath after removal
(:class:`~fastattn.features.steps.StepCounting`)."""

from __future__ import annotations

from torch import nn


def group_offloading_enabled(module: nn.Module) -> bool:
    """Whether diffusers' group offloading hooks are on ``module`` or a submodule."""
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "get_hook", lambda _: None)("group_offloading") is not None:
            return True
    return False


__all__ = ["group_offloading_enabled"]
