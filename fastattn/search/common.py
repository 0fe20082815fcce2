"""What every plan search shares: input checks, the calibration generation, and provenance.

A search installs its family's processors (without a plan), lets them decide while one
calibration generation, ``pipe(**calibration_inputs)``, runs through the pipeline, and removes
them again whatever happens. The plan records the model it was made for, the sequence length
and the CFG layout the calibration calls had, and the search's settings and cost.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..hooks import FastAttnHandle, remove_fastattn, split_pipeline


def check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {threshold!r}")
    return float(threshold)


def check_pipeline(pipe, calibration_inputs, search: str):
    """(transformer, scheduler) of ``pipe``; one-line errors for what a search cannot run on."""
    if not isinstance(calibration_inputs, dict):
        raise TypeError("calibration_inputs must be a dict of keyword arguments for pipe(...)")
    transformer, scheduler = split_pipeline(pipe)
    if scheduler is None or not callable(pipe):
        raise TypeError(f"{search} needs a pipeline (with .transformer and .scheduler), not a bare transformer")
    return transformer, scheduler


def describe_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able summary of the calibration inputs for the plan's provenance."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            out[key] = f"tensor{list(value.shape)}"
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = type(value).__name__
    return out


class CfgSeen:
    """The CFG layout of the calibration calls: 'batched' (both branches in one call),
    'separate' (one call per branch) or 'none' (guidance 1); recorded as ``plan.model['cfg']``."""

    def __init__(self):
        self.batched = self.separate = False

    def record(self, call) -> None:
        self.batched |= call.cfg is not None
        self.separate |= call.branch > 0

    @property
    def mode(self) -> str:
        return "batched" if self.batched else "separate" if self.separate else "none"


def run_calibration(pipe, calibration_inputs: dict[str, Any], handle: FastAttnHandle,
                    close=None) -> tuple[float, CfgSeen]:
    """``pipe(**calibration_inputs)`` with the pipeline's own progress bar off (the search shows
    its own), then ``close()`` and removal of every fastattn hook, even on error. Returns the
    seconds it took and the CFG layout of its transformer calls."""
    seen = CfgSeen()
    forward = handle.intercept or handle.raw_forward

    def observed(*args, **kwargs):
        seen.record(handle.state.call)
        return forward(*args, **kwargs)

    handle.intercept = observed
    progress_config = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            pipe(**calibration_inputs)
    finally:
        if close is not None:
            close()
        remove_fastattn(handle.transformer)
        if progress_config is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = progress_config
    return time.perf_counter() - started, seen


def plan_model(handle: FastAttnHandle, cfg: CfgSeen, **extra) -> dict[str, Any]:
    """What the plan was made for: the adapter's description, the tokens seen, the CFG layout."""
    model = handle.adapter.describe(handle.transformer)
    model.update(seq_len=handle.state.seq_len, **extra)
    model["cfg"] = cfg.mode
    return model


def provenance(algorithm: str, threshold: float, seconds: float, calibration_inputs: dict[str, Any],
               settings: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The plan's ``search`` record."""
    return {"algorithm": algorithm, "threshold": threshold, **settings, "seconds": round(seconds, 3),
            "calibration": describe_inputs(calibration_inputs), **(metadata or {})}
