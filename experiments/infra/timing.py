"""The one benchmark timer: the median time of a callable over repeats after a warm-up.

Two clocks: ``events`` (CUDA events: the GPU's time between the calls' first and last kernels, no
host synchronisation inside the timed region) and ``wall`` (the host's perf_counter between two
synchronisations: what a caller waits, launch overhead included). On a CPU both are the wall
clock; ``timer_name`` says which one a result used. ``time_graphed_ms`` times replays of the
calls captured in one CUDA graph: GPU time with the host's launch overhead taken out.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from fastattn.cuda_graphs import warm_up_on_side_stream

CLOCKS = ("events", "wall")


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Start/stop spans on one clock, summed when read. CUDA events are read after one
    synchronise; the wall clock synchronises at both ends of every span."""

    def __init__(self, device: torch.device, clock: str = "events"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.device = device
        self.events = clock == "events" and device.type == "cuda"
        self.spans: list[tuple] = []
        self._start = None

    def _now(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.spans.append((self._start, self._now()))

    def ms(self) -> float:
        if self.events:
            synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self.spans)
        return 1e3 * sum(end - start for start, end in self.spans)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10, *,
            clock: str = "events", before: Callable[[], object] | None = None,
            during: Callable[[], AbstractContextManager] | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs. ``before()``
    runs untimed ahead of every run (warm-up included); ``during()`` gives a context entered
    around each timed run only (e.g. timing hooks that must stay out of the warm-up)."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    synchronize(device)
    watches = []
    for _ in range(repeats):
        if before is not None:
            before()
        watch = Stopwatch(device, clock)
        with during() if during is not None else nullcontext():
            watch.start()
            fn()
            watch.stop()
        watches.append(watch)
    return statistics.median(watch.ms() for watch in watches)


def time_graphed_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10,
                    calls: int = 10, before_capture: Callable[[], object] | None = None) -> float | None:
    """GPU milliseconds per ``fn()`` with the host's launch overhead taken out: ``calls`` calls
    captured in one CUDA graph, the replays timed. ``before_capture()`` runs eagerly between the
    warm-up and the capture (e.g. a step that fills caches). None on a CPU or when ``fn`` cannot
    be captured."""
    if device.type != "cuda":
        return None
    warm_up_on_side_stream(fn, max(warmup, 1))
    if before_capture is not None:
        before_capture()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError:
        return None
    return time_ms(graph.replay, device, 1, repeats) / calls


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "wall_clock"
