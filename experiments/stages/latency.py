"""Latency as the paper's Tables 3-4 report it: end to end per sample, and the part of it spent
in the self-attention modules, on the benchmark timer (experiments/infra/timing.py: CUDA events on a
GPU, the wall clock on a CPU; warm-up, then the median of repeats)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from fastattn.models import get_adapter

from ..infra.timing import Stopwatch, time_ms, timer_name


class AttentionTimer:
    """Times every call of the self-attention modules through forward hooks (no model change);
    the hooks go on creation and come off at the end of a ``with`` block or on ``remove()``."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        self.watch = Stopwatch(device)
        layers = get_adapter(transformer).attention_layers(transformer)
        self.handles = [h for attn in layers for h in (
            attn.register_forward_pre_hook(lambda *_: self.watch.start()),
            attn.register_forward_hook(lambda *_: self.watch.stop()))]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> "AttentionTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def measure_latency(pipe, run_once: Callable[[], None], *, batch_size: int, device: torch.device, warmup: int,
                    repeats: int, attention: bool) -> dict:
    """Median seconds per sample of ``run_once()`` (one generation of ``batch_size`` samples)."""
    attention_timers: list[AttentionTimer] = []

    def attention_hooks() -> AttentionTimer:  # a fresh timer around each timed generation
        attention_timers.append(AttentionTimer(pipe.transformer, device))
        return attention_timers[-1]

    total_ms = time_ms(run_once, device, warmup, repeats, during=attention_hooks if attention else None)
    attention_ms = statistics.median(t.watch.ms() for t in attention_timers) if attention_timers else None
    return {
        "latency_s": total_ms / 1e3 / batch_size,
        "attn_latency_s": attention_ms / 1e3 / batch_size if attention_ms is not None else None,
        "timer": timer_name(device),
        "repeats": repeats,
        "batch_size": batch_size,
    }
