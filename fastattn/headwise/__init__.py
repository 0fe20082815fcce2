"""DiTFastAttnV2 for multimodal DiTs: head-wise arrow attention, head-wise caching, RSE search."""

from .methods import CACHE, CFG, FULL, HeadMethod, arrow

_LAZY = {
    "apply_headwise": ".apply",
    "search_headwise_plan": ".search",
    "choose_head_methods": ".milp",
    "greedy_head_methods": ".milp",
    "relative_squared_error": ".rse",
    "LatencyTable": ".latency",
}


def __getattr__(name):  # the heavier modules import hooks and diffusers-facing code; load on use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = ["CACHE", "CFG", "FULL", "HeadMethod", "arrow", *_LAZY]
