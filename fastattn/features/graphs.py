"""CUDA graphs on the handle: each step layout replayed from a graph (:mod:`fastattn.cuda_graphs`).

The part installs a :class:`~fastattn.cuda_graphs.StepGraphs` as ``handle.graphs`` (the handle's
forward replays through it while a plan runs) and turns the family's caches static; removal
turns both back. It asks the family whether its plans run under graphs
(:data:`~fastattn.family.CUDA_GRAPHS` in ``state.supports``, then ``state.cuda_graphs_refusal()``)
and the model whether it can be replayed (:func:`graphs_refusal`)."""

from __future__ import annotations

from ..cache_store import parse_cache_options
from ..cuda_graphs import StepGraphs
from ..family import CUDA_GRAPHS
from .compile import compiled_modules
from .offloading import group_offloading_enabled
from .part import Part


def graphs_refusal(transformer) -> str | None:
    """Why ``transformer`` cannot be replayed from CUDA graphs, in one line; None if it can."""
    if group_offloading_enabled(transformer):
        return ("cuda_graphs: the transformer has diffusers group offloading, whose weights move "
                "during each forward; a graph replays fixed addresses")
    if compiled_modules(transformer):
        return ("cuda_graphs: the transformer (or its blocks) is compiled with torch.compile; use one or "
                "the other: compiling replaces fastattn's CUDA graphs")
    return None


class CudaGraphs(Part):
    """``handle.graphs`` and static caches while installed. ``mode`` and ``capture_at`` as in
    :class:`~fastattn.cuda_graphs.StepGraphs`."""

    name = "cuda_graphs"

    def __init__(self, mode: str = "cuda", capture_at: int = 1):
        self.mode, self.capture_at = mode, capture_at

    def install(self, handle) -> None:
        state = handle.state
        if CUDA_GRAPHS not in state.supports:
            raise NotImplementedError(f"cuda_graphs: {type(state).__name__} plans run eagerly for now")
        refusal = state.cuda_graphs_refusal()
        if refusal:
            raise NotImplementedError(refusal)
        store = state.cache_store
        if store is not None:  # the caches' options must hold under graphs
            parse_cache_options(store.dtype, store.device, cuda_graphs=True)
        refusal = graphs_refusal(handle.transformer)
        if refusal:
            raise ValueError(refusal)
        handle.graphs = StepGraphs(handle.processors, mode=self.mode, capture_at=self.capture_at,
                                   module=handle.transformer)
        state.static_caches = True

    def remove(self, handle) -> None:
        handle.graphs = None
        handle.state.static_caches = False


__all__ = ["CudaGraphs", "graphs_refusal"]
