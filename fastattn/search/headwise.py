"""DiTFastAttnV2's head-wise plan search: per-layer RSE, per-head integer program, progressive.

One calibration generation runs through the pipeline with head-wise processors in search
mode. At every step and layer (in the order the forward pass reaches them) the layer computes
its full-attention output and each candidate's (arrow attention at each window; the previous
step's per-head outputs for ``cache``; for ``cfg``, where the call holds a CFG batch, the
conditional half copied to the unconditional one), measures the RSE of every head under every
candidate, chooses per-head methods with :func:`~fastattn.headwise.milp.choose_head_methods`, and passes
the compressed output on. So later layers and steps are decided on the compressed trajectory
("progressive update"), and the cost is one generation plus the candidates' attention.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..headwise.apply import install_headwise
from ..headwise.latency import LatencyTable
from ..headwise.methods import CACHE, CFG, FULL, HeadMethod, arrow, arrow_rs
from ..headwise.milp import choose_head_methods
from ..headwise.plan import HeadPlan
from ..headwise.rse import relative_squared_errors
from ..kernels.arrow import arrow_attention
from .common import check_pipeline, check_threshold, plan_model, provenance, run_calibration

DEFAULT_WINDOWS = (1 / 16, 1 / 32, 1 / 64)  # of the image tokens on each side: the V2 paper's bands of 1/8, 1/16, 1/32


class HeadwiseSearch:
    """Decides each layer's head methods when the forward pass reaches it.

    With residual sharing, each layer's processor keeps, per branch, the residual full - arrow
    of every head at every window from the head's last full step ([windows, B, H, S, D]); an
    ``arrow+rs`` candidate is available to a head once it has one, at the window it already
    committed to since that refresh (one window per refresh)."""

    def __init__(self, state, windows, use_cache: bool, share_cfg: bool, threshold: float,
                 coefficient: float, latency: LatencyTable, progress: bool, residual_sharing: bool = False):
        self.state = state
        self.windows = list(windows)
        self.arrows = [arrow(f) for f in self.windows]
        self.use_cache = use_cache
        self.share_cfg = share_cfg  # offer CFG sharing where a call holds a CFG batch
        self.residual_sharing = residual_sharing
        self.threshold, self.coefficient = threshold, coefficient
        self.latency = latency
        self.progress = progress
        self.rows: list[list[list[HeadMethod] | None]] = []
        self.errors: list[list[float | None]] = []  # summed RSE of the chosen methods per layer
        self.rs_ready: dict[int, np.ndarray] = {}  # layer -> [heads, windows]: arrow+rs allowed
        self.num_steps: int | None = None
        self.bar = None

    def start(self, num_steps: int) -> None:
        self.num_steps, self.rows, self.errors, self.rs_ready = num_steps, [], [], {}
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=num_steps * self.state.num_layers, desc="head-wise search", unit="layer",
                        disable=not self.progress)

    def __call__(self, layer: int, q, k, v, image_start: int, image_len: int, cache, residual):
        call = self.state.call
        step, n_layers, heads = call.step, self.state.num_layers, q.shape[1]
        cond = call.cond_half(q.shape[0])
        reference = arrow_attention(q, k, v, [image_len] * heads, image_start, image_len)  # full
        arrows = [arrow_attention(q, k, v, [m.half_width(image_len)] * heads, image_start, image_len)
                  for m in self.arrows]
        methods, outputs = [FULL, *self.arrows], [reference, *arrows]
        rs_columns = []
        if self.residual_sharing and residual is not None:
            rs_columns = list(range(len(methods), len(methods) + len(self.arrows)))
            methods += [arrow_rs(f) for f in self.windows]
            outputs += [a + r.to(a.dtype) for a, r in zip(arrows, residual, strict=True)]
        if self.use_cache and cache is not None and cache.shape == reference.shape:
            methods.append(CACHE)
            outputs.append(cache)
        if self.share_cfg and cond is not None:
            methods.append(CFG)
            outputs.append(torch.cat([reference[cond], reference[cond]]))
        if call.branch > 0:  # a later call of the step (a separate CFG pass): run what the first decided
            choice = [methods.index(m) for m in self.rows[step][layer]]
        else:
            choice = self._decide(layer, step, n_layers, methods, outputs, reference, rs_columns, q.shape[-2] - image_len,
                                  image_len)
        out = torch.stack([outputs[c][:, h] for h, c in enumerate(choice)], dim=1)
        if self.residual_sharing:
            residual = self._refresh(residual, [methods[c] for c in choice], reference, arrows)
        return out, residual

    def _decide(self, layer, step, n_layers, methods, outputs, reference, rs_columns, text_len, image_len):
        while len(self.rows) <= step:
            self.rows.append([None] * n_layers)
            self.errors.append([None] * n_layers)
        rse = relative_squared_errors(outputs, reference).cpu().numpy()
        if rs_columns:  # a head without a residual at a window, or committed to another window
            ready = self.rs_ready[layer]
            rse[:, rs_columns] = np.where(ready, rse[:, rs_columns], np.nan)
        costs = [self.latency.cost(m, image_len, text_len) for m in methods]
        choice = choose_head_methods(rse, costs, self.threshold, self.coefficient)
        chosen = [methods[c] for c in choice]
        if self.residual_sharing:
            ready = self.rs_ready.setdefault(layer, np.zeros((len(chosen), len(self.windows)), dtype=bool))
            for h, m in enumerate(chosen):
                if m.kind == "full":
                    ready[h] = True
                elif m.shares_residual:
                    ready[h] = [f == m.fraction for f in self.windows]
        self.rows[step][layer] = chosen
        self.errors[step][layer] = float(sum(rse[h, c] for h, c in enumerate(choice)))
        if self.bar is not None:
            self.bar.update(1)
        return choice

    def _refresh(self, residual, chosen, reference, arrows):
        """Every full head's residual at every window: full - arrow, from this step."""
        full = [h for h, m in enumerate(chosen) if m.kind == "full"]
        if not full or not arrows:
            return residual
        fresh = torch.stack([reference - a for a in arrows])  # [windows, B, H, S, D]
        if residual is None:
            return fresh
        sel = torch.tensor(full, device=fresh.device)
        return residual.index_copy_(2, sel, fresh.index_select(2, sel).to(residual.dtype))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def search_headwise_plan(
    pipe,
    calibration_inputs: dict[str, Any],
    threshold: float = 0.2,
    *,
    windows: Iterable[float] = DEFAULT_WINDOWS,
    use_cache: bool = True,
    share_cfg: bool = True,
    residual_sharing: bool = True,
    head_coefficient: float | None = 1.5,
    latency: LatencyTable | str | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> HeadPlan:
    """Search a head-wise (V2) plan for a joint-attention pipeline (SD3, FLUX).

    ``calibration_inputs`` are the keyword arguments of one ``pipe(...)`` call; ``threshold`` is
    the per-layer RSE budget δ; ``windows`` the arrow windows tried, as fractions of the image
    tokens on each side of a query; ``use_cache`` / ``share_cfg`` offer head-wise caching / CFG sharing (the latter only
    where the pipeline runs a CFG batch, so plans with it need CFG on); ``residual_sharing``
    offers ``arrow+rs`` at each window (arrow plus the head's residual from its last full step,
    the V2 paper's residual sharing; the search then keeps those residuals for every window,
    one [B, heads, tokens, head_dim] tensor per window and layer); ``latency`` a
    :class:`LatencyTable` or the path of the benchmark's table (default: the analytic fallback).
    """
    threshold = check_threshold(threshold)
    if head_coefficient is not None and (isinstance(head_coefficient, bool) or not isinstance(
            head_coefficient, (int, float)) or not head_coefficient > 0):
        raise ValueError(f"head_coefficient must be a number > 0 or None (no per-head constraint), got {head_coefficient!r}")
    windows = [float(w) for w in windows]
    for w in windows:
        arrow(w)  # a named error for a window out of (0, 1]
    if not isinstance(latency, LatencyTable):
        latency = LatencyTable.load(latency) if latency else LatencyTable()
    check_pipeline(pipe, calibration_inputs, "search_headwise_plan")

    handle = install_headwise(pipe)
    coefficient = None if head_coefficient is None else float(head_coefficient)
    search = HeadwiseSearch(handle.state, windows, use_cache, share_cfg, threshold, coefficient,
                            latency, progress, residual_sharing=bool(residual_sharing))
    handle.state.decide = search
    handle.on_generation = search.start
    cost, cfg = run_calibration(pipe, calibration_inputs, handle, close=search.close)
    if search.num_steps is None or len(search.rows) != search.num_steps or any(None in r for r in search.rows):
        raise RuntimeError(f"search decided {len(search.rows)} steps for {search.num_steps} scheduler steps")

    settings = {"head_coefficient": coefficient, "windows": windows, "cache": bool(use_cache),
                "cfg_sharing": bool(share_cfg and cfg.batched), "residual_sharing": bool(residual_sharing),
                "latency": latency.source,
                "layer_rse": search.errors}
    heads = [[[str(m) for m in layer] for layer in row] for row in search.rows]
    return HeadPlan(heads, model=plan_model(handle, cfg, text_len=handle.state.text_len),
                    search=provenance("headwise", threshold, cost, calibration_inputs, settings, metadata))
