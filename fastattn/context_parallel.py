"""What diffusers' context parallelism (``enable_parallelism``) tells a processor: into how many
shards its sequence is cut, and the process groups of its Ulysses exchange and of its ring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Group:
    """A process group of context parallelism: the group, this rank's place in it and its size."""

    group: Any
    rank: int
    world: int


def _context(processor):
    return getattr(getattr(processor, "_parallel_config", None), "context_parallel_config", None)


def sequence_shards(processor) -> int:
    """Into how many shards diffusers' context parallelism cuts the processor's sequence (1 without)."""
    config = _context(processor)
    return 1 if config is None else config.ring_degree * config.ulysses_degree


def ring_group(processor) -> Group | None:
    """The ring of a processor split with ``ring_degree > 1``; None without one."""
    config = _context(processor)
    if config is None or config.ring_degree <= 1:
        return None
    return Group(config._ring_mesh.get_group(), config._ring_local_rank, config.ring_degree)


def ulysses_group(processor) -> Group | None:
    """The Ulysses group of a processor split with ``ulysses_degree > 1``; None without one."""
    config = _context(processor)
    if config is None or config.ulysses_degree <= 1:
        return None
    return Group(config._ulysses_mesh.get_group(), config._ulysses_local_rank, config.ulysses_degree)


__all__ = ["Group", "ring_group", "sequence_shards", "ulysses_group"]
