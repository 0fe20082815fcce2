"""The redundancy job: one generation of the configured model recorded with forward hooks on its
self-attention layers (the model is not changed), reduced to the statistics of DiTFastAttn's
Figures 3 and 4 (``analysis.redundancy``), written as files and figures and logged.

Everything is reduced on the fly: per layer the recorder keeps one previous step of W, R and the
output, and a distance histogram; attention maps are computed a block of queries at a time.

    python -m experiments.redundancy                     # the default model, into outputs/redundancy/...
    python -m experiments.redundancy model=tiny_pixart plans_dir=outputs/sweeps/<sweep>
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fastattn.family import CachingProcessor, CallInfo, FamilyState
from fastattn.hooks import install, remove_fastattn, split_pipeline
from fastattn.kernels import dense_attention, window_attention, window_half_width
from fastattn.models import get_adapter
from fastattn.attention_io import project_qkv
from fastattn.utils.paths import slug

from . import harness_module
from .infra.app import ConfigError, hydra_app, resolve_device
from .infra.conditions import Conditions, to_device
from .infra.config import check_device, check_int
from .infra.logger import started_logger
from .infra.pipelines import build_pipeline

plot_all = harness_module("analysis.figures").plot_all
plan_heatmaps = harness_module("analysis.heatmaps").plan_heatmaps
RedundancyStats = harness_module("analysis.redundancy").RedundancyStats
summarise_stats = harness_module("analysis.redundancy").summarise_stats


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the cosine similarity of the flattened tensors."""
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


class RedundancyRecorder:
    """Context manager recording :class:`RedundancyStats` over the generations run inside it.

    Steps and CFG branches come from the handle's step counter (the recorder is installed as a
    family that changes no layer, replacing any fastattn installation while it records): the
    statistics are taken on each
    step's first call; the CFG cosine compares the halves of a CFG batch, or the outputs of a
    step's first and second call where the pipeline runs the branches as separate calls.
    ``query_block`` bounds the attention-map memory to [batch, heads, query_block, seq_len];
    ``locality_every`` computes the distance histogram every k-th step only (it is O(L²)).
    """

    def __init__(self, pipe_or_transformer, window_size: float = 0.125, query_block: int = 256,
                 locality_every: int = 1):
        self.transformer, _ = split_pipeline(pipe_or_transformer)
        self.adapter = get_adapter(self.transformer)
        self.layers = self.adapter.attention_layers(self.transformer)
        self.window_size = window_size
        self.query_block, self.locality_every = query_block, locality_every
        self.branch, self.cfg = 0, None  # the call being recorded: its branch and CFG layout
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        n = len(self.layers)
        self.step = -1
        self.rows: dict[str, list[list[float]]] = {k: [] for k in ("step_cosine", "window_mse", "residual_mse",
                                                                  "cfg_cosine")}
        self.previous: list[dict] = [{} for _ in range(n)]
        self.distance_sum = None  # [layers, heads, L], float64
        self.distance_count = 0
        self.seq_len = self.num_heads = None

    def __enter__(self) -> "RedundancyRecorder":
        install(self.transformer, self._family)  # the handle's counter calls _begin_call for every call
        for i, attn in enumerate(self.layers):
            self._handles.append(attn.register_forward_hook(self._make_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        remove_fastattn(self.transformer)

    def _family(self, transformer, adapter, layers) -> tuple[FamilyState, list[CachingProcessor]]:
        state = RecordingState(len(layers), self._begin_call)
        return state, [OwnProcessor(state, attn.processor) for attn in layers]

    def _begin_call(self, call: CallInfo) -> None:
        self.step, self.branch, self.cfg = call.step, call.branch, call.cfg
        if self.branch == 0:
            for rows in self.rows.values():
                rows.append([float("nan")] * len(self.layers))

    def _make_hook(self, index: int):
        def hook(attn, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                self._record(index, attn, x, output)

        return hook

    def _record(self, l: int, attn, x: torch.Tensor, output: torch.Tensor) -> None:
        s, prev = self.step, self.previous[l]
        if self.branch > 0:  # a later call of the step: the other CFG branch of a separate-call pipeline
            if self.branch == 1:
                self.rows["cfg_cosine"][s][l] = _cosine(prev["output"], output)
            return
        q, k, v = project_qkv(attn, x)
        batch, heads, seq_len, _ = q.shape
        self.seq_len, self.num_heads = seq_len, heads
        w = window_half_width(seq_len, self.window_size)
        full, window = dense_attention(q, k, v), window_attention(q, k, v, w)
        residual = full - window
        if "output" in prev:
            self.rows["step_cosine"][s][l] = _cosine(output, prev["output"])
            self.rows["window_mse"][s][l] = _mse(window, prev["window"])
            self.rows["residual_mse"][s][l] = _mse(residual, prev["residual"])
        if self.cfg is not None:  # both CFG halves in this call
            self.rows["cfg_cosine"][s][l] = _cosine(output[: batch // 2], output[batch // 2:])
        self.previous[l] = {"output": output, "window": window, "residual": residual}
        if s % self.locality_every == 0:
            self._accumulate_distances(l, q, k)

    def _accumulate_distances(self, l: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Attention probability mass summed by |q - k|, one block of queries at a time."""
        batch, heads, seq_len, head_dim = q.shape
        if self.distance_sum is None:
            self.distance_sum = np.zeros((len(self.layers), heads, seq_len))
        keys = torch.arange(seq_len, device=q.device)
        hist = torch.zeros(heads, seq_len, dtype=torch.float64, device=q.device)
        for start in range(0, seq_len, self.query_block):
            qb = q[:, :, start:start + self.query_block].float()
            probs = (qb @ k.float().transpose(-1, -2) * head_dim**-0.5).softmax(-1)  # [B, H, Qb, L]
            distance = (torch.arange(start, start + qb.shape[2], device=q.device)[:, None] - keys[None]).abs()
            mass = probs.sum(0).double()  # summed over the batch: [H, Qb, L]
            hist.scatter_add_(1, distance.flatten()[None].expand(heads, -1), mass.reshape(heads, -1))
        # mean over queries and samples: every query row sums to 1, so each head's histogram sums to 1
        self.distance_sum[l] += (hist / (batch * seq_len)).cpu().numpy()
        if l == len(self.layers) - 1:
            self.distance_count += 1

    def stats(self) -> RedundancyStats:
        if self.step < 0:
            raise RuntimeError("nothing recorded: run a generation inside the recorder")
        distance_mass = self.distance_sum / max(self.distance_count, 1)
        w = window_half_width(self.seq_len, self.window_size)
        return RedundancyStats(
            num_steps=self.step + 1, num_layers=len(self.layers), num_heads=self.num_heads, seq_len=self.seq_len,
            window_size=self.window_size, cond_first=self.adapter.cond_first,
            distance_mass=distance_mass, window_share=distance_mass[:, :, : w + 1].sum(-1),
            **{k: np.asarray(v, dtype=np.float64) for k, v in self.rows.items()},
        )


class RecordingState(FamilyState):
    """A family that changes no layer: the handle tells it each call (step, branch, CFG layout),
    and it passes the call on to the recorder."""

    def __init__(self, num_layers: int, begin_call: Callable[[CallInfo], None]):
        super().__init__(num_layers)
        self.begin_call = begin_call

    def on_call(self, call: CallInfo) -> None:
        super().on_call(call)
        self.begin_call(call)


class OwnProcessor(CachingProcessor):
    """The layer's own processor, run as it is (no caches), every argument by its own name."""

    def __init__(self, state: FamilyState, inner):
        super().__init__()
        self.state = state
        self.wrap(inner)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, **self.args.named(args, kwargs))


def record_redundancy(pipe, pipe_inputs: dict, **recorder_kwargs) -> RedundancyStats:
    """Run ``pipe(**pipe_inputs)`` once under a :class:`RedundancyRecorder`."""
    with RedundancyRecorder(pipe, **recorder_kwargs) as recorder, torch.no_grad():
        pipe(**pipe_inputs)
    return recorder.stats()


def check_redundancy_config(cfg: DictConfig) -> None:
    if cfg.plans_dir and not Path(cfg.plans_dir).is_dir():
        raise ConfigError(f"plans_dir not found: {cfg.plans_dir}")
    check_int(cfg, "num_samples", "query_block", "locality_every", "solver.num_steps")
    check_device(cfg)


def run_redundancy(cfg: DictConfig) -> dict:
    """Record one generation of the configured model, write figures and numbers, log them."""
    check_redundancy_config(cfg)
    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    pipe = build_pipeline(cfg.model, cfg.solver, device)
    inputs = Conditions(cfg.model).inputs(range(cfg.num_samples), int(cfg.seed), int(cfg.solver.num_steps),
                                          float(cfg.guidance_scale))
    stats = record_redundancy(pipe, to_device(inputs, device), window_size=float(cfg.window_size),
                              query_block=int(cfg.query_block), locality_every=int(cfg.locality_every))
    prefix = slug(f"{cfg.model.name}_{cfg.solver.name}")
    stats.save(out_dir, prefix=prefix)
    figures = plot_all(stats, out_dir, prefix)
    if cfg.plans_dir:
        figures.update({p.stem: p for p in plan_heatmaps(cfg.plans_dir, out_dir)})
    summary = summarise_stats(stats)
    with started_logger(cfg, out_dir) as logger:
        logger.log(summary, images=figures)
    for key, value in summary.items():
        print(f"{key:<40} {value:.4f}")
    print(f"figures and numbers: {out_dir}")
    return summary


main = hydra_app("redundancy", run_redundancy)

if __name__ == "__main__":
    main()
