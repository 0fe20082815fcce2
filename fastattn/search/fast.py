"""A fast layer-wise search: Algorithm 1's rule on predicted losses, in about three raw generations.

Algorithm 1 (:mod:`.greedy`) runs the model once per (step, layer, candidate) trial. This search
keeps its rule, strategy order and threshold schedule, and replaces the trials by a model of the
loss fitted on the calibration generation itself. At every searched step it

1. probes: one pass with every layer full gives the reference output O and, at each layer, each
   candidate's attention output on the same inputs (computed inside the layer, as the budget
   search probes); e[l, m] = ||o_m - o||^2 / ||o||^2 is its relative squared error;
2. predicts: one candidate alone at layer l moves the transformer output by
   a_lm = G_l F_m A(s) sqrt(e[l, m]) (about linear in the perturbation's size), a set of decided
   layers by (sum_j (k_m(j) a_j)^p)^(1/p). Measured, the gain G_l varies about 3x over the layers and
   F_m 2x over the methods, while all of them drift together about 10x along the schedule. So
   trials (one method alone at one layer, the blocks before it replayed) measure G_l for every
   layer at a few calibration steps, F_m on the anchor layer (the last searched one, whose trial
   costs one block) there, and the drift A(s) with one anchor trial at every other step; the
   corrections k_m, one per method and refitted after every step, absorb how the layers' errors
   combine and what one anchor layer's F_m misses elsewhere: a step's excess (or slack) over its
   prediction goes to its methods in proportion to their shares of it (the least change in
   log k_m that fits the step), so a method that dominates the steps it is used in is corrected
   most, not every method alike;
3. decides as Algorithm 1 does: layer by layer the first strategy (cheapest cost class first,
   the lowest loss within one) whose predicted prefix loss is below (i/|M|) delta, else full;
4. commits: re-runs the step with those methods, writing the caches later steps read. Its output
   against O is the step's real loss, the one Algorithm 1's last passing trial measured: the k_m
   are refitted from it, and where it is not below the last compressed layer's limit the caches
   are rolled back and the step decided again with the corrected k_m (a closed-loop check), as long as
   the projected cost stays within ``max_raw_generations``.

Cost: a probe and a commit per step (two raw generations), the calibrations (CALIBRATION_SHARE of
one), an anchor trial per step (1/|M| of one) and the corrections. The probe also computes each
candidate's attention inside the layers, which the block count does not see; ``seconds`` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..layerwise.methods import Method
from .common import BlockReplay, cost_class, global_mean
from .seam import LayerwiseSearchSeam

# How the layers' output losses combine within a step before k corrects it: 1 adds them up (the
# triangle inequality's bound while the loss is about linear in the perturbation, so a prefix is
# never judged looser than its layers' own losses; k_m < 1 where they partly cancel), 2 would add
# them in quadrature (independent errors). 1 gave the better plans on the built-in model.
COMBINE_P = 1.0
# The share of one raw generation spent on calibrations (one trial per layer each): their number
# follows from it (at least one, at the first searched step; at most MAX_CALIBRATIONS).
CALIBRATION_SHARE = 0.4
MAX_CALIBRATIONS = 10
# A corrected step is decided with every k_m this much above the fitted ones, so it lands below its limit.
CORRECTION_MARGIN = 1.1


def check_max_raw_generations(value) -> float:
    """The cost bound on the corrections: a number >= 2, since every step costs a probe and a commit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 2:
        raise ValueError(f"max_raw_generations must be a number >= 2 (a probe and a commit per step), got {value!r}")
    return float(value)


class FastSearch:
    """State of one fast search over a calibration generation (same interface as GreedySearch)."""

    def __init__(self, handle, strategies, threshold: float, loss_fn, progress: bool, layers=None, group=None,
                 skipped_steps=(), max_raw_generations: float = 3.0):
        self.handle = handle
        self.state = handle.state  # read for the call being run; decisions go through the seam
        self.seam = LayerwiseSearchSeam(handle.state, handle.processors)
        self.adapter = handle.adapter
        self.forward = handle.raw_forward
        self.num_layers = self.state.num_layers
        self.strategies = strategies
        self.forecasts = Method.FORECAST in strategies
        self.layers = set(range(self.num_layers) if layers is None else layers)
        self.skipped_steps = set(skipped_steps)
        self.threshold = threshold
        self.loss_fn = loss_fn
        self.group = group
        self.max_raw_generations = max_raw_generations
        self.replay = BlockReplay(self.adapter.blocks(handle.transformer))
        self.rows: list[list[Method]] = []
        self.losses: list[list[float | None]] = []  # each decided layer's predicted prefix loss
        self.step_losses: list[float | None] = []  # the committed step's measured loss
        self.num_steps: int | None = None
        self.progress = progress
        self.bar = None
        self.reset()

    def reset(self) -> None:
        n = self.num_layers
        self.layer_gain = np.full(n, np.nan)  # G_l, at the last calibration's anchor scale
        self.method_factor: dict[Method, float] = {}  # F_m, from the anchor layer's trials
        self.anchor_ref: float | None = None  # the anchor's gain at the last calibration, A(c)
        self.anchor_scale = 1.0  # A(s) / A(c)
        self.calibration_steps: set[int] = set()
        self.weights: dict[Method, float] = {}  # k_m: k per method, fitted from the commits' losses
        self.passes = 0.0  # transformer passes run, in whole passes of one call (equal on every rank)
        self.calls_per_step = 0  # transformer calls of step 0 (two where CFG branches run apart)
        self.corrections = 0
        self.rows, self.losses, self.step_losses = [], [], []

    def start(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.reset()
        self.calibration_steps = calibration_steps(num_steps, self.num_layers)
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=max(0, num_steps - 1), desc="plan search (fast)", unit="step",
                        disable=not self.progress)

    def _run(self, methods, args, kwargs, write_caches: bool = False):
        """The transformer's output with ``methods``; committed (every layer that may refresh does,
        every layer keeps its output and, with forecast, the one before: a later step may need
        them) or a trial (nothing written)."""
        if write_caches:
            self.seam.commit(methods, keep_history=self.forecasts)
        else:
            self.seam.trial(methods)
        return self.forward(*args, **kwargs)

    def _loss(self, reference: torch.Tensor, output: torch.Tensor) -> float:
        loss = self.loss_fn(reference, output)
        return global_mean(loss, reference.numel(), self.group) if self.group is not None else loss

    # -- 1. probe ---------------------------------------------------------------------------
    def _probe(self, strategies, args, kwargs) -> tuple[torch.Tensor, np.ndarray]:
        """O with every layer full, and e[l, m] (NaN where a candidate cannot run or is not tried)."""
        n = self.num_layers
        # ||o_m - o||^2 and ||o||^2 per layer and candidate, on the outputs' device (no host sync
        # per candidate: one copy after the pass); whether the candidate ran at all, on the host
        sums: list[torch.Tensor] = []
        ran = torch.zeros(n, len(strategies), dtype=torch.float64)

        def record(layer: int, full: torch.Tensor, outputs: dict) -> None:
            if layer not in self.layers:
                return
            if not sums:
                sums.append(torch.zeros(2, n, len(strategies), dtype=torch.float64, device=full.device))
            norm = torch.linalg.vector_norm(full, dtype=torch.float32).double() ** 2
            for method, out in outputs.items():
                c = strategies.index(method)
                diff = torch.linalg.vector_norm(out.to(full.dtype) - full, dtype=torch.float32).double()
                sums[0][0, layer, c], sums[0][1, layer, c], ran[layer, c] = diff ** 2, norm, 1.0

        self.replay.configure(record_all=True)  # every block's output, for the gain trials
        try:
            with self.seam.probing(strategies, record):
                reference = self.adapter.sample(self.forward(*args, **kwargs))
        finally:
            self.replay.configure()
        self.passes += 1
        totals = sums[0].cpu() if sums else torch.zeros(2, n, len(strategies), dtype=torch.float64)
        if self.group is not None:  # the whole calibration batch's sums; a candidate counts where every rank ran it
            import torch.distributed as dist

            device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
            both = torch.cat([totals, ran[None]]).to(device)
            dist.all_reduce(both, group=self.group)
            totals, ran = both[:2].cpu(), (both[2] == dist.get_world_size(self.group)).cpu().double()
        errors = np.full((n, len(strategies)), np.nan)
        valid = (ran > 0) & (totals[1] > 0)
        errors[valid.numpy()] = (totals[0][valid] / totals[1][valid]).numpy()
        return reference, errors

    # -- 2. predict: the gains ----------------------------------------------------------------
    def _trial(self, layer: int, method: Method, error: float, reference, args, kwargs) -> float:
        """The output loss of ``method`` alone at ``layer`` (the blocks before it replayed) per
        unit sqrt(e): the layer's gain for that method at this step."""
        trial = [Method.FULL] * self.num_layers
        trial[layer] = method
        self.replay.configure(replay_upto=layer)
        try:
            loss = self._loss(reference, self.adapter.sample(self._run(trial, args, kwargs)))
        finally:
            self.replay.configure()
        self.passes += (self.num_layers - layer) / self.num_layers
        return loss / math.sqrt(error)

    def _calibrate(self, errors: np.ndarray, strategies, reference, args, kwargs) -> None:
        """The gains h_lm(s) = G_l F_m A(s) / A(c). At a calibration step c: one trial per layer
        (its worst candidate) gives G_l, and the anchor layer (the last searched one, the cheapest
        trial) tries every candidate for F_m. At every other step one anchor trial gives A(s), the
        drift along the schedule that all layers share to first order; a layer first seen with
        candidates there (forecast ready) is calibrated then."""
        n, step = self.num_layers, self.state.step
        worst = [int(np.argmax(np.where(np.isfinite(row), row, -1.0))) for row in errors]
        usable = [l for l in range(n) if np.isfinite(errors[l, worst[l]]) and errors[l, worst[l]] > 0]
        if not usable:
            return
        anchor = max(usable)
        full = step in self.calibration_steps or self.anchor_ref is None
        if full:
            gains = {c: self._trial(anchor, strategies[c], errors[anchor, c], reference, args, kwargs)
                     for c in range(len(strategies)) if np.isfinite(errors[anchor, c]) and errors[anchor, c] > 0}
            ref = gains[worst[anchor]]
            if ref > 0:
                self.method_factor = {strategies[c]: g / ref for c, g in gains.items()}
            self.anchor_ref, self.anchor_scale = ref, 1.0
            self.layer_gain[anchor] = ref
        else:
            m = strategies[worst[anchor]]
            h = self._trial(anchor, m, errors[anchor, worst[anchor]], reference, args, kwargs)
            if self.anchor_ref:
                self.anchor_scale = h / self.method_factor.get(m, 1.0) / self.anchor_ref
        for l in usable:
            if l != anchor and (full or not np.isfinite(self.layer_gain[l])):
                m = strategies[worst[l]]
                h = self._trial(l, m, errors[l, worst[l]], reference, args, kwargs)
                self.layer_gain[l] = h / self.method_factor.get(m, 1.0) / self.anchor_scale

    # -- 3. decide ----------------------------------------------------------------------------
    def _decide(self, errors: np.ndarray, strategies) -> tuple[list[Method], list[float | None], dict]:
        """Algorithm 1's rule on predicted losses; also each decided method's share of a^p (k_m in)."""
        n = self.num_layers
        factors = np.array([self.method_factor.get(m, 1.0) * self.weights.get(m, 1.0) for m in strategies])
        amplitude = self.anchor_scale * self.layer_gain[:, None] * factors[None] * np.sqrt(errors)  # NaN: cannot run
        decided, losses = [Method.FULL] * n, [None] * n
        total = 0.0  # sum of a^p over the decided layers
        parts: dict[Method, float] = {}  # the same per method
        for i in range(n):
            limit = (i + 1) / n * self.threshold
            passed = None  # (predicted loss, method, a^p)
            for c, method in enumerate(strategies):
                a = amplitude[i, c]
                if not np.isfinite(a):
                    continue
                if passed is not None and cost_class(method) != cost_class(passed[1]):
                    break  # a cheaper strategy passed
                term = a ** COMBINE_P
                predicted = (total + term) ** (1 / COMBINE_P)
                if predicted < limit and (passed is None or predicted < passed[0]):
                    passed = (predicted, method, term)
            if passed is not None:
                losses[i], decided[i] = float(passed[0]), passed[1]
                total += passed[2]
                parts[passed[1]] = parts.get(passed[1], 0.0) + passed[2]
        return decided, losses, parts

    def _refit(self, parts: dict, ratio: float, rate: float) -> None:
        """Moves the k_m so that the decided set's prediction moves by ``ratio`` ** ``rate`` (to
        first order), with the least change in log k_m: each method takes the excess (or the
        slack) in proportion to its share of the prediction, so a method that dominates the steps
        it is used in is corrected most."""
        total = sum(parts.values())
        shares = {m: v / total for m, v in parts.items()}
        norm = sum(x * x for x in shares.values())
        for m, x in shares.items():
            self.weights[m] = self.weights.get(m, 1.0) * ratio ** (rate * x / norm / COMBINE_P)

    # -- 4. commit and check ------------------------------------------------------------------
    def _affordable(self) -> bool:
        """Whether one more pass keeps the projected cost within ``max_raw_generations``: the
        steps left cost a probe and a commit each (counted in passes, the same on every rank)."""
        left = self.num_steps - 1 - self.state.step
        budget = self.max_raw_generations * self.num_steps * max(1, self.calls_per_step)
        other_calls = (max(1, self.calls_per_step) - 1) * (self.num_steps - self.state.step)
        n, step = self.num_layers, self.state.step
        ahead = sum(1 for c in self.calibration_steps if c > step)  # trials still to run
        trials = ahead * ((n + 1) / 2 + len(self.strategies) / n) + left / n
        return self.passes + 1 + 2 * left + other_calls + trials <= budget

    def _search_step(self, args, kwargs):
        """Probe, calibrate, decide, commit (and correct) one step: its methods, predicted losses,
        the committed output (which goes back to the pipeline) and its measured loss (None where
        every layer stays full)."""
        n = self.num_layers
        strategies = [m for m in self.strategies if self.state.call.cfg is not None or not m.shares_cfg]
        reference, errors = self._probe(strategies, args, kwargs)
        self._calibrate(errors, strategies, reference, args, kwargs)
        snapshot = self.seam.park()
        while True:
            decided, losses, parts = self._decide(errors, strategies)
            out = self._run(decided, args, kwargs, write_caches=True)
            self.passes += 1
            combined = sum(parts.values()) ** (1 / COMBINE_P)
            if combined == 0:  # every layer full (or exact): nothing to learn from
                return decided, losses, out, None
            actual = self._loss(reference, self.adapter.sample(out))
            fitted = actual / combined
            last = max(i for i, m in enumerate(decided) if m is not Method.FULL)
            if actual < (last + 1) / n * self.threshold or not self._affordable():
                self._refit(parts, fitted, 0.5)  # the next step's: a smoothed fit
                return decided, losses, out, actual
            self.seam.restore(snapshot)  # the model was wrong at this step: decide it again
            self._refit(parts, max(1.0, fitted), 1.0)
            self.weights = {m: w * CORRECTION_MARGIN for m, w in self.weights.items()}
            self.corrections += 1

    def __call__(self, *args, **kwargs):
        """Stands in for transformer.forward during the calibration generation."""
        n, st = self.num_layers, self.state
        skipped = st.step in self.skipped_steps
        with torch.no_grad():
            if st.step == 0:
                self.calls_per_step += 1
            if st.call.branch > 0:  # a later call of the same step (separate CFG pass): same methods
                self.passes += 1
                return self._run(self.rows[-1], args, kwargs, write_caches=not skipped)
            if st.step == 0 or not self.strategies or skipped:
                # A step the block cache will skip runs (the trajectory needs an output) but writes
                # no cache and counts as no computed step, as when stacked.
                decided, losses, loss = [Method.FULL] * n, [None] * n, None
                self.passes += 1
                out = self._run(decided, args, kwargs, write_caches=not skipped)
            else:
                decided, losses, out, loss = self._search_step(args, kwargs)
            self.rows.append(decided)
            self.losses.append(losses)
            if st.step > 0:
                self.step_losses.append(loss)
                if self.bar is not None:
                    self.bar.update(1)
            return out

    def settings(self) -> dict:
        """What the plan's provenance records of this search besides Greedy's fields."""
        return {"combine_p": COMBINE_P, "calibration_steps": sorted(self.calibration_steps),
                "corrections": self.corrections,
                "step_losses": self.step_losses,
                "loss_scales": {m.value: w for m, w in self.weights.items()},
                "max_raw_generations": self.max_raw_generations}

    def close(self) -> None:
        self.seam.detach()
        self.replay.uninstall()
        if self.bar is not None:
            self.bar.close()


def calibration_steps(num_steps: int, num_layers: int) -> set[int]:
    """The steps that calibrate every layer: as many as CALIBRATION_SHARE of a raw generation pays
    for ((|M| + 1) / 2 passes each), spread evenly from the first searched step."""
    count = int(CALIBRATION_SHARE * num_steps / ((num_layers + 1) / 2))
    count = max(1, min(MAX_CALIBRATIONS, count, num_steps - 1))
    return {1 + round(i * (num_steps - 1) / count) for i in range(count)}
