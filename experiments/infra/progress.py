"""Progress in the units a person counts: samples (or timed runs) that move with every denoising
step, so a batch that takes a minute shows where it is and when it will end.

The bar counts what ``advance(amount)`` is given per generation, spread over the generation's
scheduler steps (a wrapper on ``pipe.scheduler.step`` for the bar's lifetime). It shows after a
second only, so a job that stops at once (a refused plan) prints nothing but its one line.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} {unit} [{elapsed}<{remaining}]"


class StepProgress:
    """A bar of ``total`` units; :meth:`generation` says how many units the next generation makes."""

    def __init__(self, pipe, total: float, desc: str, unit: str, enabled: bool = True):
        self.pipe, self.done, self.share = pipe, 0.0, 0.0
        self.bar = tqdm(total=total, desc=desc, unit=unit, bar_format=FORMAT, delay=1.0, disable=not enabled)

    def generation(self, amount: float) -> None:
        """The next generation makes ``amount`` units: close the previous one's share exactly."""
        self.finish_generation()
        self.share = amount

    def finish_generation(self) -> None:
        self.done += self.share
        self.share = 0.0
        self.bar.update(min(self.done, self.bar.total) - self.bar.n)  # exact, not a sum of step shares

    def on_step(self) -> None:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        steps = len(timesteps) if timesteps is not None and len(timesteps) else 1
        self.bar.update(min(self.share / steps, self.bar.total - self.bar.n))


@contextmanager
def step_progress(pipe, total: float, desc: str, unit: str = "samples", enabled: bool = True) -> Iterator[StepProgress]:
    """A :class:`StepProgress` moving with every ``pipe.scheduler.step`` call inside the block."""
    progress = StepProgress(pipe, total, desc, unit, enabled)
    scheduler = getattr(pipe, "scheduler", None)
    step = getattr(scheduler, "step", None)  # None: a pipeline-like callable; the bar moves per generation
    had_own = step is not None and "step" in vars(scheduler)

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        progress.on_step()
        return out

    if step is not None:
        scheduler.step = counted_step
    try:
        yield progress
        progress.finish_generation()
    finally:
        if had_own:
            scheduler.step = step
        elif step is not None:
            del scheduler.step
        progress.bar.close()
