"""The scheduler's ``set_timesteps``, wrapped: it marks the start of each generation (caches
dropped, the schedule's step count checked against the plan)."""

from __future__ import annotations

import functools

from .part import Part
from .steps import count_steps


class SchedulerWrapper(Part):
    """``set_timesteps`` as an instance attribute that calls the scheduler's own, then
    ``handle.new_generation``; removal deletes it, so the class's method shows again."""

    name = "scheduler"

    def install(self, handle) -> None:
        scheduler = handle.scheduler
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return
        original = scheduler.set_timesteps

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            handle.new_generation(count_steps(scheduler.timesteps))
            return out

        set_timesteps._fastattn_wrapper = True
        scheduler.set_timesteps = set_timesteps

    def remove(self, handle) -> None:
        scheduler = handle.scheduler
        if scheduler is not None and getattr(scheduler.__dict__.get("set_timesteps"), "_fastattn_wrapper", False):
            del scheduler.set_timesteps


__all__ = ["SchedulerWrapper"]
