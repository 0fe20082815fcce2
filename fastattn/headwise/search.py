"""DiTFastAttnV2's head-wise plan search: per-layer RSE, per-head integer program, progressive.

One calibration generation runs through the pipeline with head-wise processors in search
mode. At every step and layer (in the order the forward pass reaches them) the layer computes
its full-attention output and each candidate's (arrow attention at each window; the previous
step's per-head outputs for ``cache``; for ``cfg``, where the pipeline runs a CFG batch, the
conditional half copied to the unconditional one), measures the RSE of every head under every
candidate, chooses per-head methods with :func:`~fastattn.headwise.milp.choose_head_methods`, and passes
the compressed output on. So later layers and steps are decided on the compressed trajectory
("progressive update"), and the cost is one generation plus the candidates' attention.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..hooks import remove_fastattn, split_pipeline
from ..kernels.arrow import arrow_attention
from ..plan import CompressionPlan
from ..search.greedy import _describe_inputs as describe_inputs
from .apply import install_headwise
from .latency import LatencyTable
from .methods import CACHE, CFG, FULL, HeadMethod, arrow
from .milp import choose_head_methods
from .processor import cond_half_of
from .rse import relative_squared_errors

DEFAULT_WINDOWS = (1 / 8, 1 / 16, 1 / 32)  # of the image tokens, as in the V2 paper


class HeadwiseSearch:
    """Decides each layer's head methods when the forward pass reaches it."""

    def __init__(self, state, windows, use_cache: bool, cfg_cond_first: bool | None, threshold: float,
                 coefficient: float, latency: LatencyTable, progress: bool):
        self.state = state
        self.arrows = [arrow(f) for f in windows]
        self.use_cache = use_cache
        self.cfg_cond_first = cfg_cond_first  # None: no CFG sharing candidate
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
        step, n_layers, heads = self.state.step, self.state.num_layers, q.shape[1]
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
        cond = None if self.cfg_cond_first is None else cond_half_of(q.shape[0], self.cfg_cond_first)
        if cond is not None:
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
) -> CompressionPlan:
    """Search a head-wise (V2) plan for a joint-attention pipeline (SD3, FLUX).

    ``calibration_inputs`` are the keyword arguments of one ``pipe(...)`` call; ``threshold`` is
    the per-layer RSE budget δ; ``windows`` the arrow widths tried, as fractions of the image
    tokens; ``use_cache`` / ``share_cfg`` offer head-wise caching / CFG sharing (the latter only
    where the pipeline runs a CFG batch, so plans with it need CFG on); ``latency`` a
    :class:`LatencyTable` or the path of the benchmark's table (default: the analytic fallback).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if isinstance(head_coefficient, bool) or not isinstance(head_coefficient, (int, float)) or not head_coefficient > 0:
        raise ValueError(f"head_coefficient must be a number > 0, got {head_coefficient!r}")
    windows = [float(w) for w in windows]
    for w in windows:
        arrow(w)  # a named error for a window out of (0, 2]
    if not isinstance(latency, LatencyTable):
        latency = LatencyTable.load(latency) if latency else LatencyTable()
    if not isinstance(calibration_inputs, dict):
        raise TypeError("calibration_inputs must be a dict of keyword arguments for pipe(...)")
    transformer, scheduler = split_pipeline(pipe)
    if scheduler is None or not callable(pipe):
        raise TypeError("search_headwise_plan needs a pipeline (with .transformer and .scheduler)")

    handle = install_headwise(pipe)
    guidance = calibration_inputs.get("guidance_scale", handle.adapter.default_guidance_scale)
    cfg = bool(handle.adapter.cfg_batch and guidance > 1)
    search = HeadwiseSearch(handle.state, windows, use_cache, handle.adapter.cond_first if cfg and share_cfg else None,
                            float(threshold), float(head_coefficient), latency, progress)
    handle.state.decide = search
    handle.on_generation = search.start
    started = time.perf_counter()
    try:
        with torch.no_grad():
            pipe(**calibration_inputs)
    finally:
        search.close()
        handle.state.decide = None
        remove_fastattn(pipe)
    seconds = time.perf_counter() - started
    if search.num_steps is None or len(search.rows) != search.num_steps or any(None in r for r in search.rows):
        raise RuntimeError(f"search decided {len(search.rows)} steps for {search.num_steps} scheduler steps")

    model = handle.adapter.describe(transformer)
    model.update(seq_len=handle.state.seq_len, text_len=handle.state.text_len)
    model["cfg"] = cfg
    info = {
        "algorithm": "headwise",
        "threshold": float(threshold),
        "head_coefficient": float(head_coefficient),
        "windows": windows,
        "cache": bool(use_cache),
        "cfg_sharing": bool(cfg and share_cfg),
        "latency": latency.source,
        "seconds": round(seconds, 3),
        "calibration": describe_inputs(calibration_inputs),
        "layer_rse": search.errors,
        **(metadata or {}),
    }
    heads = [[[str(m) for m in layer] for layer in row] for row in search.rows]
    return CompressionPlan.from_heads(heads, model=model, search=info)
