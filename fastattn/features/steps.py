"""Step counting: the one step-and-branch counter, and the part that counts every transformer call.

A forward pre-hook on the transformer reads the timestep argument of every call (``timestep``, or
the name the adapter gives, ``ModelAdapter.timestep_arg``), and a new step starts when its value
changes; the calls within one step are its *branches*. Wrappers that
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
    """Step and branch of every transformer call, from its timestep value.

    The value of a call's timestep: a number, or a tensor whose elements all agree (one per
    sample) is that number. A tensor whose elements differ (per-frame or per-token timesteps:
    diffusion forcing, a clean conditioning frame at t=0) is told apart from another by its
    (min, max, sum), so a step starts where any element moves, not only the first; its value (what
    forecast extrapolates along) is its largest element, the noisiest tokens'."""

    def __init__(self, timestep_arg: str = "timestep"):
        self.timestep_arg = timestep_arg  # the forward argument read
        self.reset()

    def reset(self) -> None:
        self.step = -1  # the step being run, -1 before the first call
        self.branch = 0  # the call's index within its step
        self.calls = 0  # transformer calls since the last reset
        self._last_timestep: tuple | None = None  # keys (timestep_key) of the last call and of step 0
        self._first_timestep: tuple | None = None  # step 0's: seen again later, a new generation began

    def timestep_key(self, module, args, kwargs) -> tuple | None:
        """What tells the call's timestep from another's (see the class); None when it has none."""
        t = call_argument(module, args, kwargs, self.timestep_arg)
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            # One host read per transformer call (not per layer): the schedulers' step() already
            # syncs every step, and tensor identity is no substitute (the allocator reuses
            # addresses, so a fresh timestep tensor can look like the previous step's).
            if t.numel() == 1:
                return (float(t.reshape(-1)[0]),)
            flat = t.detach().reshape(-1)
            low, high = flat.aminmax()
            low, high, total = (float(x) for x in torch.stack([low, high, flat.sum()]).tolist())
            return (high,) if low == high else (low, high, total)
        return (float(t),) if isinstance(t, (int, float)) else None

    @staticmethod
    def value_of(key: tuple | None) -> float | None:
        """A timestep's value: the number its elements agree on, else its largest element."""
        return None if key is None else key[0] if len(key) == 1 else key[1]

    def timestep_of(self, module, args, kwargs) -> float | None:
        """The call's timestep value, or None when it has none."""
        return self.value_of(self.timestep_key(module, args, kwargs))

    def starts_step(self, timestep: tuple | None) -> bool:
        """Whether a call whose timestep has this key (:meth:`timestep_key`) starts a step."""
        return timestep is None or self.step < 0 or timestep != self._last_timestep

    def restarts(self, timestep: tuple | None) -> bool:
        """Whether a call opens a new generation: a later step's call whose timestep falls back to
        step 0's (a generation interrupted before its last step, then started again without a
        scheduler to say so). Schedules never return to their first timestep within a generation."""
        return (timestep is not None and self.step > 0 and timestep == self._first_timestep
                and timestep != self._last_timestep)

    def advance(self, timestep: tuple | None) -> tuple[int, int]:
        """Count a call whose timestep has this key: its (step, branch)."""
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
