"""fastattn under ``torch.compile``, as the handle sees it: which modules are compiled, and
dynamo's recompile limit raised to the graphs each plan needs (:mod:`fastattn.compile`)."""

from __future__ import annotations

from torch import nn

from ..compile import allow_plan_recompiles
from .part import Part


def compiled_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules that ``nn.Module.compile`` (or regional compilation) compiled."""
    return [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]


class RecompileLimits(Part):
    """At each plan, raises dynamo's recompile limit to the graphs the plan needs under
    ``torch.compile`` (:func:`~fastattn.compile.allow_plan_recompiles`), so no step falls back to eager."""

    name = "compile"

    def plan_set(self, handle) -> None:
        allow_plan_recompiles(handle)


__all__ = ["RecompileLimits", "compiled_modules"]
