"""Branch parking: every processor's caches kept per CFG branch, so no family tracks branches.

The calls within one step (a pipeline running the conditional and unconditional passes as
separate calls, as FLUX with true CFG and Wan do) are its branches; before a call of another
branch than the last one runs, the last branch's caches are parked and the new one's restored."""

from __future__ import annotations

from .part import Part


class BranchParking(Part):
    """Parks and restores the processors' caches (:attr:`~fastattn.family.CachingProcessor.CACHE_SLOTS`)
    per branch; drops them all at a new generation, or with static caches (CUDA graphs: captured
    graphs point at them) goes back to branch 0's, kept in place."""

    name = "branches"

    def __init__(self):
        self.branch = 0  # whose caches the processors hold
        self.parked: dict[int, list[tuple]] = {}

    def begin_call(self, handle, call) -> None:
        self._switch(handle.processors, call.branch)

    def reset(self, handle) -> None:
        if handle.state.static_caches:
            self._switch(handle.processors, 0)
        else:
            self._drop(handle.processors)

    def remove(self, handle) -> None:
        self._drop(handle.processors)

    def _drop(self, processors) -> None:
        self.parked.clear()
        for p in processors:
            p.reset()
        self.branch = 0

    def _switch(self, processors, new: int) -> None:
        """Park the caches of the branch that just ran, and load those of ``new``."""
        if new == self.branch:
            return
        self.parked[self.branch] = [p.park() for p in processors]
        self.branch = new
        parked = self.parked.get(new)
        for i, p in enumerate(processors):
            if parked is None:
                p.reset()
            else:
                p.restore(parked[i])


__all__ = ["BranchParking"]
