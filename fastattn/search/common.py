"""What every plan search shares: input checks, the calibration generation, and provenance.

A search installs its family's processors (without a plan), lets them decide while one
calibration generation, ``pipe(**calibration_inputs)``, runs through the pipeline, and removes
them again whatever happens. The plan records the model it was made for, the sequence length
and the CFG layout the calibration calls had, and the search's settings and cost.

The cost is counted, not timed: every block forward a search runs adds the batch rows of its
transformer call, and the sum over one raw generation's (the calibration generation's own calls,
every block once) is the search's cost in raw generations, comparable across machines.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..hooks import FastAttnHandle, remove_fastattn, split_pipeline
from ..layerwise.methods import Method
from ..models.adapters.base import latents_of


def check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {threshold!r}")
    return float(threshold)


def cost_class(method: Method) -> tuple[bool, bool, bool]:
    """Methods with the same attention cost at a step: AST and forecast compute nothing, the others
    differ by window and CFG sharing. Algorithm 1 keeps the first passing strategy in order of
    compression; among strategies of one cost class it keeps the one with the lowest loss."""
    return method.computes, method.uses_window, method.shares_cfg


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


class StopForward(Exception):
    """Raised after the last block a run needs; the rest of the transformer is skipped."""


class BlockReplay:
    """Wraps each block's forward so a run can replay, record, or stop at given blocks, and counts
    the work the blocks really do: a replayed block costs nothing, one after a stop never runs.

    ``call_rows`` is the batch rows of the transformer call under way (:func:`run_calibration` sets
    it: a temporal block's own first dimension is not the batch); every block forward run adds it
    to ``block_rows``."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.blocks = blocks
        self.prefix: list[Any] = [None] * len(blocks)
        self.call_rows = 1
        self.block_calls = self.block_rows = 0
        self.configure()
        self._previous = [block.__dict__.get("forward") for block in blocks]  # a wrapper someone put there
        for j, block in enumerate(blocks):
            block.forward = self._wrap(j, block.forward)

    def configure(self, replay_upto: int = 0, record: int | None = None, stop_after: int | None = None,
                  record_all: bool = False) -> None:
        """Replay blocks before ``replay_upto`` from ``prefix``; keep block ``record``'s output in
        ``recorded`` (every block's in ``prefix`` with ``record_all``); stop after ``stop_after``."""
        self.replay_upto, self.record, self.stop_after = replay_upto, record, stop_after
        self.record_all = record_all
        self.recorded = None

    def _wrap(self, j: int, forward: Callable) -> Callable:
        def replaying_forward(*args, **kwargs):
            if j < self.replay_upto:
                return self.prefix[j]
            self.block_calls += 1
            self.block_rows += self.call_rows
            out = forward(*args, **kwargs)
            if j == self.record:
                self.recorded = out
            if self.record_all:
                self.prefix[j] = out
            if j == self.stop_after:
                raise StopForward
            return out

        return replaying_forward

    def uninstall(self) -> None:
        for block, previous in zip(self.blocks, self._previous, strict=True):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous


def global_mean(local_mean: float, local_count: int, group) -> float:
    """A mean over the whole calibration batch, each rank of ``group`` holding a share: the sums
    of the terms and the counts are added up, so the mean is that of one process with the whole
    batch (a mean of per-rank means would weight unequal shares wrongly)."""
    import torch.distributed as dist

    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    totals = torch.tensor([local_mean * local_count, local_count], dtype=torch.float64, device=device)
    dist.all_reduce(totals, group=group)
    return float(totals[0] / totals[1])


def search_cost(seconds: float, blocks: BlockReplay, raw_block_rows: int) -> dict[str, Any]:
    """The plan's ``search["cost"]``: block rows run over one raw generation's, and seconds."""
    return {"raw_generations": round(blocks.block_rows / raw_block_rows, 3) if raw_block_rows else None,
            "block_calls": blocks.block_calls, "seconds": round(seconds, 3)}


def total_cost(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost of several calibration generations of the same inputs (one raw generation each)."""
    raw = [c["raw_generations"] for c in costs]
    return {"raw_generations": None if None in raw else round(sum(raw), 3),
            "block_calls": sum(c["block_calls"] for c in costs), "seconds": round(sum(c["seconds"] for c in costs), 3)}


def run_calibration(pipe, calibration_inputs: dict[str, Any], handle: FastAttnHandle, close=None,
                    blocks: BlockReplay | None = None) -> tuple[dict[str, Any], CfgSeen]:
    """``pipe(**calibration_inputs)`` with the pipeline's own progress bar off (the search shows
    its own), then ``close()`` and removal of every fastattn hook, even on error. Returns the
    search's cost (:func:`search_cost`) and the CFG layout of its transformer calls.

    ``blocks``: the search's own :class:`BlockReplay`, which counts its work; without one, a
    counting one is put on the blocks for the generation."""
    seen = CfgSeen()
    forward = handle.intercept or handle.raw_forward
    raw_block_rows = 0

    def observed(*args, **kwargs):
        nonlocal raw_block_rows
        seen.record(handle.state.call)
        latents = latents_of(args, kwargs)
        counter.call_rows = int(latents.shape[0]) if latents is not None and latents.ndim else 1
        raw_block_rows += counter.call_rows * len(counter.blocks)  # what the raw generation runs
        return forward(*args, **kwargs)

    handle.intercept = observed
    progress_config = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    counter = blocks if blocks is not None else BlockReplay(handle.adapter.blocks(handle.transformer))
    started = time.perf_counter()
    try:
        with torch.no_grad():
            pipe(**calibration_inputs)
    finally:
        if blocks is None:
            counter.uninstall()
        if close is not None:
            close()
        remove_fastattn(handle.transformer)
        if progress_config is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = progress_config
    return search_cost(time.perf_counter() - started, counter, raw_block_rows), seen


def plan_model(handle: FastAttnHandle, cfg: CfgSeen, **extra) -> dict[str, Any]:
    """What the plan was made for: the adapter's description, the tokens seen, the CFG layout."""
    model = handle.adapter.describe(handle.transformer)
    model.update(seq_len=handle.state.seq_len, **extra)
    model["cfg"] = cfg.mode
    return model


def provenance(algorithm: str, threshold: float, cost: dict[str, Any], calibration_inputs: dict[str, Any],
               settings: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The plan's ``search`` record (``seconds``, as before ``cost`` was, beside it)."""
    return {"algorithm": algorithm, "threshold": threshold, **settings, "seconds": cost["seconds"], "cost": cost,
            "calibration": describe_inputs(calibration_inputs), **(metadata or {})}
