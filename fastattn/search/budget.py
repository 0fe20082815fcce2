"""A budgeted plan search over DiTFastAttn's (V1) methods with DiTFastAttnV2's formulation.

One calibration generation runs through the pipeline. At every step after the first it

1. probes: runs the step with every layer full and, at each layer, also the output of every
   candidate method that the layer's caches allow (AST and forecast from the outputs the plan
   so far has left, WA-RS from its residual, ASC where the call holds a CFG batch), and measures
   each candidate's relative squared error against the layer's full output (V2's RSE);
2. chooses: the methods that minimise the step's attention FLOPs subject to the layers' summed
   RSE <= delta, an integer program solved with ``scipy.optimize.milp`` (HiGHS), skipped where
   every layer's own cheapest admissible method already fits (V2's
   :func:`~fastattn.headwise.milp.choose_head_methods`, layers in the place of heads);
3. commits: re-runs the step with those methods, writing the caches later steps read, and hands
   its output to the pipeline.

So each step's errors are measured with the earlier steps' choices in place: a layer whose
cache has gone stale (AST after a run of AST steps) shows a larger error and is recomputed, the
compounding across steps the layer-wise greedy search does not see. With a FLOPs ``budget``
instead of ``delta``, delta is searched over calibration generations (in log space) so that the plan's attention FLOPs fraction is the largest found that does not exceed the budget.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..headwise.milp import choose_head_methods
from ..headwise.rse import relative_squared_errors
from ..layerwise.apply import install_layerwise
from ..layerwise.flops import method_cost
from ..layerwise.methods import PAPER_STRATEGIES, Method, parse_strategies
from ..layerwise.plan import LayerPlan
from .common import BlockReplay, check_pipeline, check_threshold, plan_model, provenance, total_cost
from .seam import LayerwiseSearchSeam, check_layerwise_settings, run_search


# How much the plan's FLOPs fraction falls per decade of delta before two runs say otherwise
# (about 0.3 on the built-in model with V1's methods): the first bracketing step's guess.
SLOPE_PER_DECADE = 0.3


def method_costs(methods, seq_len: int, heads: int, head_dim: int, model_dim: int | None, window_size: float,
                 window_shape: str = "band") -> list[float]:
    """Each method's attention FLOPs at one layer and step, as a fraction of ``full``'s."""
    shape = dict(seq_len=seq_len, heads=heads, head_dim=head_dim, model_dim=model_dim, window_size=window_size,
                 window_shape=window_shape)
    full = method_cost(Method.FULL, refresh=False, **shape).total
    return [method_cost(m, refresh=False, **shape).total / full for m in methods]


def check_budget(budget, num_steps: int | None = None) -> float:
    """A FLOPs fraction in (0, 1], and (given the step count) not below one full step of all."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be an attention FLOPs fraction in (0, 1], got {budget!r}")
    if num_steps is not None and budget < 1 / num_steps:
        raise ValueError(f"budget {budget:g} is below the least a plan of {num_steps} steps reaches, "
                         f"{1 / num_steps:.4g} (step 0 stays full)")
    return float(budget)


class BudgetSearch:
    """Probes, chooses and commits every step of one calibration generation at a fixed delta."""

    def __init__(self, handle, strategies: tuple[Method, ...], threshold: float, progress: bool,
                 budget: float | None = None, sensitivity: bool = False):
        self.handle, self.state = handle, handle.state  # the state is read; decisions go through the seam
        self.seam = LayerwiseSearchSeam(handle.state, handle.processors)
        self.forward = handle.raw_forward
        self.num_layers = self.state.num_layers
        self.strategies = strategies
        self.methods = (Method.FULL, *strategies)  # column 0 is the zero-error fallback
        self.threshold = threshold
        self.budget = budget
        self.progress = progress
        self.rows: list[list[Method]] = []
        self.errors: list[float | None] = []  # the chosen methods' summed RSE per step
        self.layer_errors: list[list[float | None]] = []  # and each layer's
        self.num_steps: int | None = None
        self._rse: np.ndarray | None = None
        self._costs: list[float] | None = None
        self.bar = None
        self.replay = None
        if sensitivity:
            blocks = handle.adapter.blocks(handle.transformer)
            if len(blocks) != self.num_layers:
                raise ValueError(f"sensitivity needs one self-attention layer per block, {type(handle.transformer).__name__} "
                                 f"has {self.num_layers} in {len(blocks)} blocks")
            self.replay = BlockReplay(blocks)

    def start(self, num_steps: int) -> None:
        if self.budget is not None:
            check_budget(self.budget, num_steps)  # before the first transformer call
        self.num_steps, self.rows, self.errors, self.layer_errors = num_steps, [], [], []
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=num_steps, desc=f"budget search (delta {self.threshold:.3g})", unit="step",
                        disable=not self.progress)

    def _record(self, layer: int, reference: torch.Tensor, outputs: dict) -> None:
        if not outputs:
            return
        # the layer's RSE: its whole output as one "head" (V2 measures each head the same way)
        rse = relative_squared_errors([o[None] for o in outputs.values()], reference[None], head_dim=0)[0]
        for method, value in zip(outputs, rse.tolist(), strict=True):
            self._rse[layer, self.methods.index(method)] = value

    def costs(self) -> list[float]:
        if self._costs is None:
            model = self.handle.adapter.describe(self.handle.transformer)
            self._costs = method_costs(self.methods, self.state.seq_len, model["num_heads"], model["head_dim"],
                                       model.get("model_dim"), self.state.window_size, self.state.window_shape)
        return self._costs

    def _decide(self, args, kwargs) -> list[Method]:
        n = self.num_layers
        self._rse = np.full((n, len(self.methods)), np.nan)
        self._rse[:, 0] = 0.0
        if self.replay is not None:
            self.replay.configure(record_all=True)  # every block's output, for the trials below
        with self.seam.probing(self.strategies, self._record):
            reference = self.handle.adapter.sample(self.forward(*args, **kwargs))
        if self.replay is not None:
            self._to_output_error(args, kwargs, reference)
        rse, costs = self._rse, self.costs()
        choice = choose_head_methods(rse, costs, self.threshold, coefficient=None)
        self.layer_errors.append([float(rse[l, c]) for l, c in enumerate(choice)])
        self.errors.append(float(sum(self.layer_errors[-1])))
        return [self.methods[c] for c in choice]

    def _to_output_error(self, args, kwargs, reference: torch.Tensor) -> None:
        """Scale each layer's errors to the transformer output's: one trial per layer runs its
        worst candidate there (the other layers full, the blocks before it replayed), and the
        ratio of the output's RSE to the layer's scales all of the layer's candidates (to first
        order, a layer's perturbation reaches the output through the same Jacobian)."""
        n, rse = self.num_layers, self._rse
        try:
            for l in range(n):
                errors = np.where(np.isfinite(rse[l, 1:]), rse[l, 1:], -1.0)
                c = 1 + int(errors.argmax())
                if errors[c - 1] <= 0:
                    continue
                trial = [Method.FULL] * n
                trial[l] = self.methods[c]
                self.seam.trial(trial)
                self.replay.configure(replay_upto=l)
                out = self.handle.adapter.sample(self.forward(*args, **kwargs))
                scale = float(relative_squared_errors([out[None]], reference[None], head_dim=0)[0, 0]) / rse[l, c]
                rse[l, 1:] *= scale
        finally:
            self.replay.configure()

    def __call__(self, *args, **kwargs):
        """Stands in for transformer.forward during the calibration generation."""
        n, st = self.num_layers, self.state
        with torch.no_grad():
            if st.call.branch > 0:  # a later call of the same step (separate CFG pass): same methods
                decided = self.rows[-1]
            elif st.step == 0 or not self.strategies:
                decided = [Method.FULL] * n
                self.errors.append(None)
                self.layer_errors.append([None] * n)
            else:
                decided = self._decide(args, kwargs)
            if st.call.branch == 0:
                self.rows.append(decided)
                if self.bar is not None:
                    self.bar.update(1)
            # Commit what a later step may read (with forecast among the candidates, the output before too).
            self.seam.commit(decided, keep_history=Method.FORECAST in self.strategies)
            return self.forward(*args, **kwargs)

    def close(self) -> None:
        self.seam.detach()
        if self.replay is not None:
            self.replay.uninstall()
        if self.bar is not None:
            self.bar.close()


def search_budget_plan(
    pipe,
    calibration_inputs: dict[str, Any],
    budget: float | None = None,
    *,
    threshold: float | None = None,
    strategies: Iterable[str | Method] = PAPER_STRATEGIES,
    window_size: float = 0.125,
    refresh_on: str = "full",
    forecast_in: str = "timestep",
    iterations: int = 8,
    tolerance: float = 0.02,
    sensitivity: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> LayerPlan:
    """Search a layer-wise plan at a target attention FLOPs fraction ``budget`` (or at a per-step
    RSE bound ``threshold``, one calibration generation), choosing among ``strategies`` (any of
    ast, wars, asc, wars+asc, wa, forecast; full is always the fallback) step by step with V2's
    integer program on measured, compounded per-layer errors.

    ``budget``: delta is searched in log space (bracketing, then false position) over at most
    ``iterations`` calibration generations, stopping early once the plan's fraction is within
    ``tolerance`` below the budget; the plan returned is the one with the largest fraction not
    above it.
    """
    if (budget is None) == (threshold is None):
        raise ValueError("search_budget_plan: give exactly one of budget (an attention FLOPs fraction) and threshold")
    if budget is not None:
        budget = check_budget(budget, calibration_inputs.get("num_inference_steps")
                              if isinstance(calibration_inputs, dict) else None)
    else:
        threshold = check_threshold(threshold)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    check_layerwise_settings(window_size, "band", refresh_on, forecast_in)
    strategies = parse_strategies(strategies)
    check_pipeline(pipe, calibration_inputs, "search_budget_plan")

    def run(delta: float) -> LayerPlan:
        handle = install_layerwise(pipe, window_size, refresh_on, forecast_in)
        search = BudgetSearch(handle, strategies, delta, progress, budget, sensitivity)
        cost, cfg = run_search(pipe, calibration_inputs, handle, search)
        tried = [m.value for m in strategies if cfg.batched or not m.shares_cfg]
        settings = {"budget": budget, "strategies": tried, "sensitivity": bool(sensitivity), "step_rse": search.errors,
                    "layer_rse": search.layer_errors}
        return LayerPlan(search.rows, window_size, refresh_on=refresh_on, forecast_in=forecast_in,
                         model=plan_model(handle, cfg),
                         search=provenance("budget", delta, cost, calibration_inputs, settings, metadata))

    if budget is None:
        return run(threshold)
    if budget >= 1:
        return run(0.0)
    return bisect_delta(run, budget, iterations, tolerance)


def bisect_delta(run, budget: float, iterations: int, tolerance: float) -> LayerPlan:
    """The plan ``run(delta)`` with the largest attention FLOPs fraction not above ``budget``,
    over at most ``iterations`` runs, stopping once one is within ``tolerance`` below it."""
    # The fraction falls as delta grows, about linearly in log(delta): bracket the budget by secant
    # steps in log(delta), then false position in log(delta), kept off the bracket's ends.
    target = budget - tolerance / 2
    tried: list[tuple[float, float]] = []
    best, costs = None, []
    over = within = None  # (delta, fraction): the largest delta over budget, the smallest within it
    delta = 0.1
    for _ in range(iterations):
        plan = run(delta)
        costs.append(plan.search["cost"])
        fraction = plan.attention_flops()["fraction"]
        tried.append((delta, fraction))
        if fraction <= budget:
            if best is None or fraction > best.attention_flops()["fraction"]:
                best = plan
            if fraction >= budget - tolerance:
                break
            within = (delta, fraction) if within is None or delta < within[0] else within
        else:
            over = (delta, fraction) if over is None or delta > over[0] else over
        if over is None or within is None:  # not bracketed yet: a secant step in log10(delta)
            slope = SLOPE_PER_DECADE
            if len(tried) > 1 and tried[-1][0] != tried[-2][0]:
                (da, fa), (db, fb) = tried[-2:]
                slope = min(1.0, max(0.05, (fa - fb) / (math.log10(db) - math.log10(da))))
            step = min(2.0, max(-2.0, (fraction - target) / slope))
            delta *= 10 ** (step if step else (1.0 if fraction > budget else -1.0))
        else:
            (d0, f0), (d1, f1) = over, within
            t = min(0.9, max(0.1, (f0 - target) / (f0 - f1) if f0 != f1 else 0.5))
            delta = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    if best is None:
        raise RuntimeError(f"budget search: no plan within budget {budget:g} after {iterations} iterations "
                           f"(delta, fraction tried: {', '.join(f'({d:.3g}, {f:.3f})' for d, f in tried)}); "
                           "raise iterations")
    best.search["bisection"] = [[d, f] for d, f in tried]  # (delta, fraction) of every calibration run
    best.search["cost"] = total_cost(costs)  # all of them
    best.search["seconds"] = best.search["cost"]["seconds"]
    return best
