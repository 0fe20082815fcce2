"""Dynamo's recompile limit, raised in one place for the compiled FlexAttention kernels and for
compiled transformers running plans (fastattn.kernels.flex, fastattn.compile)."""

from __future__ import annotations

_LIMITS = ("recompile_limit", "cache_size_limit")


def allow_recompiles(graphs: int) -> None:
    """Raise dynamo's per-frame recompile limit (default 8) to at least ``graphs``: past it dynamo
    would silently run the frame eagerly. Never lowers a limit."""
    import torch._dynamo.config as config

    for name in _LIMITS:
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), int(graphs)))
            break
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * int(graphs))


__all__ = ["allow_recompiles"]
