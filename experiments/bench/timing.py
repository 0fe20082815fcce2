"""Median time of a callable: CUDA events on a GPU (no host sync inside the timed region),
the wall clock on a CPU. Each result says which timer it used."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fastattn.cuda_graphs import warm_up_on_side_stream


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(a.elapsed_time(b) for a, b in pairs)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


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
