"""Latency as the paper's Tables 3-4 report it: end to end per sample, and the part of it spent
in the self-attention modules. CUDA events on a GPU (warm-up, then the median of repeats); on a
CPU the same protocol with the wall clock, and the result says which timer it used."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fastattn.models import get_adapter


class _Timer:
    """Start/stop pairs on CUDA events or the wall clock; read once, after a synchronise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._open = None

    def start(self):
        self._open = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            self._open.record()

    def stop(self):
        end = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            end.record()
        self.spans.append((self._open, end))

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return sum(b - a for a, b in self.spans)


class AttentionTimer:
    """Times every call of the self-attention modules through forward hooks (no model change)."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        self.timer = _Timer(device)
        layers = get_adapter(transformer).attention_layers(transformer)
        self.handles = [h for attn in layers for h in (
            attn.register_forward_pre_hook(lambda *_: self.timer.start()),
            attn.register_forward_hook(lambda *_: self.timer.stop()))]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure_latency(pipe, run_once: Callable[[], None], *, batch_size: int, device: torch.device, warmup: int,
                    repeats: int, attention: bool) -> dict:
    """Median seconds per sample of ``run_once()`` (one generation of ``batch_size`` samples)."""
    for _ in range(warmup):
        run_once()
    totals, attn_totals = [], []
    for _ in range(repeats):
        total = _Timer(device)
        attn_timer = AttentionTimer(pipe.transformer, device) if attention else None
        try:
            total.start()
            run_once()
            total.stop()
        finally:
            if attn_timer is not None:
                attn_timer.remove()
        totals.append(total.seconds() / batch_size)
        if attn_timer is not None:
            attn_totals.append(attn_timer.timer.seconds() / batch_size)
    return {
        "latency_s": statistics.median(totals),
        "attn_latency_s": statistics.median(attn_totals) if attn_totals else None,
        "timer": "cuda_events" if device.type == "cuda" else "wall_clock",
        "repeats": repeats,
        "batch_size": batch_size,
    }
