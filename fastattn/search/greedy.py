"""DiTFastAttn Algorithm 1: the greedy per-step, per-layer plan search.

The search runs one calibration generation through the unmodified pipeline. At each step it
intercepts the transformer call and

1. computes the raw output O (every layer full, the same input),
2. for layer i = 1..|M|, tries the strategies from most to least compressing and keeps the first
   whose loss L(O, O') < (i/|M|)·δ, layers already decided keeping their methods; otherwise full
   (strategies that cost the same, AST and forecast, are all tried and the lowest loss kept; the
   paper's four strategies all cost differently, so its search is unchanged),
3. re-runs the step with the decided methods, writing the caches (AST outputs, WA-RS residuals)
   that later steps read, and hands that output back to the pipeline, so the calibration
   trajectory is the compressed one. Step 0 stays full.

Trials for layer i cannot change blocks before i, so those blocks replay their outputs from the
decided prefix instead of recomputing them: the same decisions, about half the work.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..layerwise.apply import install_layerwise
from ..layerwise.methods import PAPER_STRATEGIES, Method, parse_strategies
from ..layerwise.plan import LayerPlan
from ..models import get_adapter
from .common import (BlockReplay, StopForward, check_pipeline, check_threshold, cost_class, global_mean, plan_model,
                     provenance)
from .fast import FastSearch, check_max_raw_generations
from .losses import get_loss
from .seam import LayerwiseSearchSeam, check_layerwise_settings, run_search


class GreedySearch:
    """State of one Algorithm-1 search over a calibration generation."""

    def __init__(self, handle, strategies, threshold: float, loss_fn, progress: bool, layers=None, group=None,
                 skipped_steps=()):
        self.handle = handle
        self.state = handle.state  # read for the call being run; decisions go through the seam
        self.seam = LayerwiseSearchSeam(handle.state, handle.processors)
        self.adapter = handle.adapter
        self.forward = handle.raw_forward  # the bound original, under the handle's step counting
        self.num_layers = self.state.num_layers
        self.strategies = strategies
        self.forecasts = Method.FORECAST in strategies
        self.layers = set(range(self.num_layers) if layers is None else layers)  # the others stay full
        self.skipped_steps = set(skipped_steps)  # a block cache will skip every block there
        self.threshold = threshold
        self.loss_fn = loss_fn
        self.group = group
        self.replay = BlockReplay(self.adapter.blocks(handle.transformer))
        self.rows: list[list[Method]] = []
        self.losses: list[list[float | None]] = []
        self.num_steps: int | None = None
        self.progress = progress
        self.bar = None

    def start(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.rows, self.losses = [], []
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=max(0, num_steps - 1) * self.num_layers, desc="plan search",
                        unit="layer", disable=not self.progress)

    def _run(self, methods, args, kwargs) -> torch.Tensor:
        self.seam.trial(methods)
        return self.adapter.sample(self.forward(*args, **kwargs))

    def _decide_step(self, args, kwargs) -> tuple[list[Method], list[float | None]]:
        n = self.num_layers
        full = [Method.FULL] * n
        # CFG sharing needs both halves in this call (guidance > 1 on a CFG-batch pipeline).
        strategies = [m for m in self.strategies if self.state.call.cfg is not None or not m.shares_cfg]
        reference = self._run(full, args, kwargs)
        decided, losses = list(full), [None] * n
        for i in range(n):
            limit = (i + 1) / n * self.threshold
            passed = None  # (loss, method, block i's output) of the best passing strategy so far
            for method in strategies if i in self.layers else ():
                if passed is not None and cost_class(method) != cost_class(passed[1]):
                    break  # a cheaper strategy passed; only those as cheap compete with it
                if self.seam.computed_outputs(i) < method.reuses_outputs:
                    continue  # forecast needs two computed outputs of the layer, AST one
                if method.uses_window and not self.seam.processors[i].windows:
                    continue  # linear attention: no window to try
                decided[i] = method
                self.replay.configure(replay_upto=i, record=i)
                loss = self.loss_fn(reference, self._run(decided, args, kwargs))
                if self.group is not None:
                    loss = global_mean(loss, reference.numel(), self.group)
                if loss < limit and (passed is None or loss < passed[0]):
                    passed = (loss, method, self.replay.recorded)
            if passed is not None:
                losses[i], decided[i], self.replay.recorded = passed
            else:
                decided[i] = Method.FULL
                if i < n - 1:  # record block i under full attention for the next layer's trials
                    self.replay.configure(replay_upto=i, record=i, stop_after=i)
                    try:
                        self._run(decided, args, kwargs)
                    except StopForward:
                        pass
            self.replay.prefix[i] = self.replay.recorded
            if self.bar is not None:
                self.bar.update(1)
        self.replay.configure()
        return decided, losses

    def __call__(self, *args, **kwargs):
        """Stands in for transformer.forward during the calibration generation."""
        n = self.num_layers
        skipped = self.state.step in self.skipped_steps
        with torch.no_grad():
            if self.state.call.branch > 0:  # a later call of the same step (separate CFG pass): same methods
                decided = self.rows[-1]
            elif self.state.step == 0 or not self.strategies or skipped:
                decided, losses = [Method.FULL] * n, [None] * n
            else:
                decided, losses = self._decide_step(args, kwargs)
            if self.state.call.branch == 0:
                self.rows.append(decided)
                self.losses.append(losses)
            # Commit what any later step may read (WA-RS, AST, with forecast among the strategies
            # the output before); a step the block cache will skip writes nothing, as when
            # stacked: later steps reuse older ones.
            self.seam.commit(decided, keep_history=self.forecasts, writes=not skipped)
            return self.forward(*args, **kwargs)

    def close(self) -> None:
        self.seam.detach()
        self.replay.uninstall()
        if self.bar is not None:
            self.bar.close()


SEARCHES = {"greedy": GreedySearch, "fast": FastSearch}


def check_layers(transformer, layers: Iterable[int] | None) -> list[int] | None:
    """The layer indices a search may compress (None: all), each in range."""
    if layers is None:
        return None
    layers = [int(i) for i in layers]
    n = len(get_adapter(transformer).attention_layers(transformer))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers: {bad} out of range for {n} self-attention layers")
    return layers


def check_skipped_steps(skipped_steps: Iterable[int] | None) -> list[int]:
    """The steps a block cache will skip, sorted; step 0 computes every layer."""
    steps = sorted({int(s) for s in skipped_steps or ()})
    if steps and steps[0] < 1:
        raise ValueError(f"skipped_steps: step {steps[0]} cannot be skipped (step 0 computes every layer)")
    return steps


def search_plan(pipe, calibration_inputs: dict[str, Any], threshold: float = 0.05, *,
                strategies: Iterable[str | Method] = PAPER_STRATEGIES, window_size: float = 0.125,
                window_shape: str = "band", refresh_on: str = "full", forecast_in: str = "timestep",
                window_fraction: float | None = None, loss: str = "mean_relative_absolute_error", progress: bool = True,
                metadata: dict[str, Any] | None = None, layers: Iterable[int] | None = None, group=None,
                skipped_steps: Iterable[int] | None = None, algorithm: str = "greedy",
                max_raw_generations: float = 3.0) -> LayerPlan:
    """Search a compression plan with DiTFastAttn's greedy Algorithm 1 (``algorithm="greedy"``,
    the default), or with its rule on predicted losses (``algorithm="fast"``, :mod:`.fast`: about
    three raw generations whatever the threshold, its checks and corrections kept within
    ``max_raw_generations``; every option below applies to both).

    ``calibration_inputs`` are the keyword arguments of one ``pipe(...)`` call (class labels or
    prompt embeddings, ``num_inference_steps``, ``guidance_scale``, a seeded ``generator``);
    the plan has one row per denoising step of that generation. ``layers`` limits the search
    to those layer indices (e.g. a video model's spatial layers); the others stay full.
    ``window_size``: the WA-RS window, the fraction of the tokens each query sees on each side
    (flash-attn's ``window_size=(w, w)`` with w = window_size * L; the paper's 1/8 is 0.125).
    ``window_shape``: ``"band"`` (the paper's 1-D band over the token sequence) or ``"tile"`` (a
    tile neighbourhood of the token grid: 2-D on images, 3-D on Wan's full video attention).
    ``refresh_on``: which steps refresh the WA-RS residual, ``"full"`` (ours) or ``"full_or_asc"``
    (the published code's rule; see :data:`fastattn.layerwise.methods.REFRESH_RULES`). ``forecast`` is a
    strategy only where ``strategies`` name it (not in the paper's default); ``forecast_in`` is its
    time axis, ``"timestep"`` or ``"step"`` (:data:`fastattn.layerwise.methods.FORECAST_AXES`).

    ``skipped_steps``: steps at which a block cache stacked with the plan (MagCache,
    FirstBlockCache) will skip the blocks, e.g. as it did on the calibration inputs. They stay
    full in the plan, and the search runs them without writing caches, so AST and forecast at
    later steps are judged reusing the outputs of the steps that will run.

    ``group``: a ``torch.distributed`` process group whose ranks each pass their own share of the
    calibration batch; losses are summed over the group, so every rank makes the same decisions
    as one process searching the whole batch would (None: this process alone).
    """
    if window_fraction is not None:  # fastattn < 0.2: the band's total width, half the paper's window
        raise TypeError(f"search_plan: window_fraction is gone; pass window_size={window_fraction / 2:g} for the "
                        f"same band (window_size is the fraction of the tokens on each side; the paper's 1/8 is 0.125)")
    if algorithm not in SEARCHES:
        raise ValueError(f"algorithm must be one of {', '.join(SEARCHES)}, got {algorithm!r}")
    max_raw_generations = check_max_raw_generations(max_raw_generations)
    threshold = check_threshold(threshold)
    check_layerwise_settings(window_size, window_shape, refresh_on, forecast_in)
    loss_fn = get_loss(loss)
    strategies = parse_strategies(strategies)
    transformer, _ = check_pipeline(pipe, calibration_inputs, "search_plan")
    layers = check_layers(transformer, layers)
    skipped_steps = check_skipped_steps(skipped_steps)
    handle = install_layerwise(pipe, window_size, refresh_on, forecast_in, window_shape)
    extra = {"max_raw_generations": max_raw_generations} if algorithm == "fast" else {}
    search = SEARCHES[algorithm](handle, strategies, threshold, loss_fn, progress, layers, group, skipped_steps, **extra)
    cost, cfg = run_search(pipe, calibration_inputs, handle, search)
    tried = [m for m in strategies if cfg.batched or not m.shares_cfg]  # CFG sharing needs a CFG batch
    settings = {"loss": loss, "strategies": [m.value for m in tried],
                **({"layers": sorted(set(layers))} if layers is not None else {}),
                **({"skipped_steps": skipped_steps} if skipped_steps else {}), "losses": search.losses,
                **(search.settings() if algorithm == "fast" else {})}
    return LayerPlan(search.rows, window_size, window_shape=window_shape, refresh_on=refresh_on, forecast_in=forecast_in,
                     model=plan_model(handle, cfg),
                     search=provenance(algorithm, threshold, cost, calibration_inputs, settings, metadata))
