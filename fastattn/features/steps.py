"""Step counting: the one step-and-branch counter, and the part that counts every transformer call.

A forward pre-hook on the transformer reads the ``timestep`` argument of every call, and a new
step starts when its value changes; the calls within one step are its *branches*. Wrappers that
call ``model.forward(...)`` directly (Open-Sora's ``forward_with_cfg``) skip ``__call__`` and its
hooks, so the instance's ``forward`` is wrapped as well; a call through ``__call__`` is counted
by the pre-hook and not again by the wrapper.
"""

from __future__ import annotations

import torch

from ..models.adapters.base import call_argument
from .part import Part


def count_steps(timesteps) -> int:
    """Denoising steps in a schedule: runs of equal consecutive timesteps count once, as the
    step counter counts them."""
    values = [float(t) for t in timesteps]
    return sum(1 for i, t in enumerate(values) if i == 0 or t != values[i - 1])


class StepCounter:
    """Step and branch of every transformer call, from its timestep value."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step = -1  # the step being run, -1 before the first call
        self.branch = 0  # the call's index within its step
        self.calls = 0  # transformer calls since the last reset
        self._last_timestep: float | None = None
        self._first_timestep: float | None = None  # step 0's: seen again later, a new generation began

    def timestep_of(self, module, args, kwargs) -> float | None:
        """The call's timestep as a number (its first element), or None when it has none."""
        t = call_argument(module, args, kwargs, "timestep")
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            # One host read per transformer call (not per layer): the schedulers' step() already
            # syncs every step, and tensor identity is no substitute (the allocator reuses
            # addresses, so a fresh timestep tensor can look like the previous step's).
            return float(t.reshape(-1)[0])
        return float(t) if isinstance(t, (int, float)) else None

    def starts_step(self, timestep: float | None) -> bool:
        return timestep is None or self.step < 0 or timestep != self._last_timestep

    def restarts(self, timestep: float | None) -> bool:
        """Whether a call opens a new generation: a later step's call whose timestep falls back to
        step 0's (a generation interrupted before its last step, then started again without a
        scheduler to say so). Schedules never return to their first timestep within a generation."""
        return (timestep is not None and self.step > 0 and timestep == self._first_timestep
                and timestep != self._last_timestep)

    def advance(self, timestep: float | None) -> tuple[int, int]:
        """Count a call with ``timestep``: its (step, branch)."""
        if self.starts_step(timestep):
            self.step, self.branch = self.step + 1, 0
            if self.step == 0:
                self._first_timestep = timestep
        else:
            self.branch += 1
        self._last_timestep = timestep
        self.calls += 1
        return self.step, self.branch


def _not_compiled(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class StepCounting(Part):
    """The forward pre-hook that counts each call (``handle.begin_call``), and the instance
    ``forward`` that counts the calls bypassing ``__call__`` and runs ``handle.run``.

    Where a wrapper was installed over our ``forward`` since (diffusers' offloading hooks,
    accelerate's), ours stays under it after removal and only passes the call on."""

    name = "step_counting"

    def __init__(self):
        self.installed = False
        self.counted = False  # set by the pre-hook, so the forward does not count the call again
        self._hook = None
        self._previous_forward = None  # an instance-level forward someone installed before us

    def install(self, handle) -> None:
        self.handle = handle
        transformer = handle.transformer
        # The step hook is left out of torch.compile graphs: it reads and writes Python state that
        # changes every step, which would otherwise force recompiles.
        self._hook = transformer.register_forward_pre_hook(_not_compiled(self._pre_hook), with_kwargs=True)
        self._previous_forward = transformer.__dict__.get("forward")
        handle.raw_forward = transformer.forward
        transformer.forward = self.forward
        self.installed = True

    def remove(self, handle) -> None:
        self.installed = False
        transformer = handle.transformer
        if transformer.__dict__.get("forward") == self.forward:
            if self._previous_forward is None:
                del transformer.forward
            else:
                transformer.forward = self._previous_forward
        self._hook.remove()

    def reset(self, handle) -> None:
        handle.counter.reset()

    def _pre_hook(self, module, args, kwargs):
        self.handle.begin_call(module, args, kwargs)
        self.counted = True

    def forward(self, *args, **kwargs):
        handle = self.handle
        if not self.installed:  # removed, but a wrapper put on top of ours (offloading) still calls it
            return handle.raw_forward(*args, **kwargs)
        if not self.counted:  # called as model.forward(...), bypassing __call__'s hooks
            handle.begin_call(handle.transformer, args, kwargs)
        self.counted = False
        return handle.run(*args, **kwargs)


__all__ = ["StepCounter", "StepCounting", "count_steps"]
