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

import torch
from tqdm.auto import tqdm

from ..headwise.apply import install_headwise
from ..headwise.latency import LatencyTable
from ..headwise.methods import CACHE, CFG, FULL, HeadMethod, arrow
from ..headwise.milp import choose_head_methods
from ..headwise.plan import HeadPlan
from ..headwise.processor import headwise_attention
from ..headwise.rse import relative_squared_errors
from ..kernels.arrow import arrow_attention
from .common import check_pipeline, check_threshold, plan_model, provenance, run_calibration

DEFAULT_WINDOWS = (1 / 8, 1 / 16, 1 / 32)  # of the image tokens, as in the V2 paper


class HeadwiseSearch:
    """Decides each layer's head methods when the forward pass reaches it."""

    def __init__(self, state, windows, use_cache: bool, share_cfg: bool, threshold: float,
                 coefficient: float, latency: LatencyTable, progress: bool):
        self.state = state
        self.arrows = [arrow(f) for f in windows]
        self.use_cache = use_cache
        self.share_cfg = share_cfg  # offer CFG sharing where a call holds a CFG batch
        self.threshold, self.coefficient = threshold, coefficient
        self.latency = latency
        self.progress = progress
        self.rows: list[list[list[HeadMethod] | None]] = []
        self.errors: list[list[float | None]] = []  # summed RSE of the chosen methods per layer
        self.num_steps: int | None = None
        self.bar = None

    def start(self, num_steps: int) -> None:
        self.num_steps, self.rows, self.errors = num_steps, [], []
        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=num_steps * self.state.num_layers, desc="head-wise search", unit="layer",
                        disable=not self.progress)

    def __call__(self, layer: int, q, k, v, image_start: int, image_len: int, cache):
        call = self.state.call
        step, n_layers, heads = call.step, self.state.num_layers, q.shape[1]
        cond = call.cond_half(q.shape[0])
        if call.branch > 0:  # a later call of the step (a separate CFG pass): run what the first decided
            methods = self.rows[step][layer]
            return headwise_attention(q, k, v, methods, image_start, image_len, cache, cond), methods
        while len(self.rows) <= step:
            self.rows.append([None] * n_layers)
            self.errors.append([None] * n_layers)
        reference = arrow_attention(q, k, v, [image_len] * heads, image_start, image_len)  # full
        methods, outputs = [FULL], [reference]
        for m in self.arrows:
            methods.append(m)
            outputs.append(arrow_attention(q, k, v, [m.half_width(image_len)] * heads, image_start, image_len))
        if self.use_cache and cache is not None and cache.shape == reference.shape:
            methods.append(CACHE)
            outputs.append(cache)
        if self.share_cfg and cond is not None:
            methods.append(CFG)
            outputs.append(torch.cat([reference[cond], reference[cond]]))
        rse = relative_squared_errors(outputs, reference).cpu().numpy()
        text_len = q.shape[-2] - image_len
        costs = [self.latency.cost(m, image_len, text_len) for m in methods]
        choice = choose_head_methods(rse, costs, self.threshold, self.coefficient)
        out = torch.stack([outputs[c][:, h] for h, c in enumerate(choice)], dim=1)
        self.rows[step][layer] = [methods[c] for c in choice]
        self.errors[step][layer] = float(sum(rse[h, c] for h, c in enumerate(choice)))
        if self.bar is not None:
            self.bar.update(1)
        return out, self.rows[step][layer]

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
    head_coefficient: float = 1.5,
    latency: LatencyTable | str | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> HeadPlan:
    """Search a head-wise (V2) plan for a joint-attention pipeline (SD3, FLUX).

    ``calibration_inputs`` are the keyword arguments of one ``pipe(...)`` call; ``threshold`` is
    the per-layer RSE budget δ; ``windows`` the arrow widths tried, as fractions of the image
    tokens; ``use_cache`` / ``share_cfg`` offer head-wise caching / CFG sharing (the latter only
    where the pipeline runs a CFG batch, so plans with it need CFG on); ``latency`` a
    :class:`LatencyTable` or the path of the benchmark's table (default: the analytic fallback).
    """
    threshold = check_threshold(threshold)
    if isinstance(head_coefficient, bool) or not isinstance(head_coefficient, (int, float)) or not head_coefficient > 0:
        raise ValueError(f"head_coefficient must be a number > 0, got {head_coefficient!r}")
    windows = [float(w) for w in windows]
    for w in windows:
        arrow(w)  # a named error for a window out of (0, 2]
    if not isinstance(latency, LatencyTable):
        latency = LatencyTable.load(latency) if latency else LatencyTable()
    check_pipeline(pipe, calibration_inputs, "search_headwise_plan")

    handle = install_headwise(pipe)
    search = HeadwiseSearch(handle.state, windows, use_cache, share_cfg, threshold, float(head_coefficient),
                            latency, progress)
    handle.state.decide = search
    handle.on_generation = search.start
    seconds, cfg = run_calibration(pipe, calibration_inputs, handle, close=search.close)
    if search.num_steps is None or len(search.rows) != search.num_steps or any(None in r for r in search.rows):
        raise RuntimeError(f"search decided {len(search.rows)} steps for {search.num_steps} scheduler steps")

    settings = {"head_coefficient": float(head_coefficient), "windows": windows, "cache": bool(use_cache),
                "cfg_sharing": bool(share_cfg and cfg.batched), "latency": latency.source,
                "layer_rse": search.errors}
    heads = [[[str(m) for m in layer] for layer in row] for row in search.rows]
    return HeadPlan(heads, model=plan_model(handle, cfg, text_len=handle.state.text_len),
                    search=provenance("headwise", threshold, seconds, calibration_inputs, settings, metadata))
