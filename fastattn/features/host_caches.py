"""The family's cache store on the handle (:mod:`fastattn.cache_store`): FP8 or host caches. At
each call, host caches are told the call's reads so they are fetched ahead
(:mod:`fastattn.cache_prefetch`); a generation's end lets go of fetches and writes under way, and
removal of the pinned buffers kept for later writes.

The part asks the state for its store at every event (``handle.state.cache_store``: None, caches
as computed), so a store set on the state after installation is served alike."""

from __future__ import annotations

from .compile import compiled_modules
from .part import Part


class HostCaches(Part):
    """Prefetch and release for whatever store the family's state holds."""

    name = "cache_store"

    def __init__(self):
        # Host caches fetch this generation's reads ahead, not under graphs or where layers are
        # compiled (a compiled layer reads its caches inside the graph): decided once per generation.
        self.fetch_ahead = False

    def begin_call(self, handle, call) -> None:
        store = handle.state.cache_store
        if store is None or store.device is None:
            return
        if call.step == 0 and call.branch == 0:  # a walk over the modules: once per generation, not per call
            self.fetch_ahead = handle.graphs is None and not compiled_modules(handle.transformer)
        store.begin_call(handle.state.call_reads() if self.fetch_ahead else None, handle.processors)

    def reset(self, handle) -> None:
        if handle.state.cache_store is not None:
            handle.state.cache_store.release()

    def remove(self, handle) -> None:
        if handle.state.cache_store is not None:
            handle.state.cache_store.release(buffers=True)


__all__ = ["HostCaches"]
