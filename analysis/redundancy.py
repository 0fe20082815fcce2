"""Where the redundancy is: the statistics behind DiTFastAttn's Figures 3 and 4, recorded during
one generation with forward hooks on the self-attention layers (the model is not changed).

- locality (Fig. 3a left): attention mass as a function of |query - key| distance per layer and
  head, and the share of it inside the WA-RS window;
- WA-RS (Fig. 3a right): MSE between consecutive steps of the window-attention output W and of
  the residual R = O - W;
- steps (Fig. 4a): cosine similarity of each layer's attention output with the previous step's;
- CFG (Fig. 4b): cosine similarity of the conditional and unconditional halves of the output.

Everything is reduced on the fly: per layer the recorder keeps one previous step of W, R and the
output, and a distance histogram; attention maps are computed a block of queries at a time.

    python -m analysis.redundancy                        # tiny DiT, figures into outputs/redundancy/...
    python -m analysis.redundancy model=tiny_pixart plans_dir=outputs/sweeps/<sweep>
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastattn.hooks import split_pipeline
from fastattn.kernels import dense_attention, window_attention, window_half_width
from fastattn.models import get_adapter
from fastattn.processor import project_qkv
from fastattn.utils.io import atomic_write_bytes


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the cosine similarity of the flattened tensors."""
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


@dataclass
class RedundancyStats:
    """The recorded statistics; NaN where a value does not exist (e.g. step 0 has no previous step)."""

    num_steps: int
    num_layers: int
    num_heads: int
    seq_len: int
    window_fraction: float
    cond_first: bool
    distance_mass: np.ndarray  # [layers, heads, seq_len]: mean attention mass at each |q - k|
    window_share: np.ndarray  # [layers, heads]: share of attention mass inside the window
    step_cosine: np.ndarray  # [steps, layers]: cos(output_t, output_{t-1})
    window_mse: np.ndarray  # [steps, layers]: MSE(W_t, W_{t-1})
    residual_mse: np.ndarray  # [steps, layers]: MSE(R_t, R_{t-1})
    cfg_cosine: np.ndarray  # [steps, layers]: cos(conditional half, unconditional half)
    meta: dict = field(default_factory=dict)

    def save(self, folder: str | Path, prefix: str = "redundancy") -> list[Path]:
        """``{prefix}.npz`` with every array, and one CSV per [steps, layers] statistic."""
        folder = Path(folder)
        buf = io.BytesIO()
        np.savez(buf, **{k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)})
        written = [atomic_write_bytes(folder / f"{prefix}.npz", buf.getvalue())]
        for name in ("step_cosine", "window_mse", "residual_mse", "cfg_cosine"):
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(["step"] + [f"layer_{l}" for l in range(self.num_layers)])
            for s, row in enumerate(getattr(self, name)):
                writer.writerow([s] + [f"{v:.6g}" for v in row])
            written.append(atomic_write_bytes(folder / f"{prefix}_{name}.csv", text.getvalue().encode()))
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["layer", "head", "window_share"])
        for l in range(self.num_layers):
            for h in range(self.num_heads):
                writer.writerow([l, h, f"{self.window_share[l, h]:.6g}"])
        written.append(atomic_write_bytes(folder / f"{prefix}_window_share.csv", text.getvalue().encode()))
        return written


class RedundancyRecorder:
    """Context manager recording :class:`RedundancyStats` over the generations run inside it.

    ``query_block`` bounds the attention-map memory to [batch, heads, query_block, seq_len];
    ``locality_every`` computes the distance histogram every k-th step only (it is O(L²)).
    """

    def __init__(self, pipe_or_transformer, window_fraction: float = 0.125, cfg: bool = True,
                 query_block: int = 256, locality_every: int = 1):
        self.transformer, _ = split_pipeline(pipe_or_transformer)
        self.adapter = get_adapter(self.transformer)
        self.layers = self.adapter.attention_layers(self.transformer)
        self.window_fraction, self.cfg = window_fraction, cfg
        self.query_block, self.locality_every = query_block, locality_every
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
        self._handles.append(self.transformer.register_forward_pre_hook(self._begin_step))
        for i, attn in enumerate(self.layers):
            self._handles.append(attn.register_forward_hook(self._make_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _begin_step(self, module, args):
        self.step += 1
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
        q, k, v = project_qkv(attn, x)
        batch, heads, seq_len, _ = q.shape
        self.seq_len, self.num_heads = seq_len, heads
        w = window_half_width(seq_len, self.window_fraction)
        full, window = dense_attention(q, k, v), window_attention(q, k, v, w)
        residual = full - window
        if "output" in prev:
            self.rows["step_cosine"][s][l] = _cosine(output, prev["output"])
            self.rows["window_mse"][s][l] = _mse(window, prev["window"])
            self.rows["residual_mse"][s][l] = _mse(residual, prev["residual"])
        if self.cfg and batch % 2 == 0:
            cond, uncond = (output[: batch // 2], output[batch // 2:])
            self.rows["cfg_cosine"][s][l] = _cosine(cond, uncond)
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
        w = window_half_width(self.seq_len, self.window_fraction)
        return RedundancyStats(
            num_steps=self.step + 1, num_layers=len(self.layers), num_heads=self.num_heads, seq_len=self.seq_len,
            window_fraction=self.window_fraction, cond_first=self.adapter.cond_first,
            distance_mass=distance_mass, window_share=distance_mass[:, :, : w + 1].sum(-1),
            **{k: np.asarray(v, dtype=np.float64) for k, v in self.rows.items()},
        )


def record_redundancy(pipe, pipe_inputs: dict, **recorder_kwargs) -> RedundancyStats:
    """Run ``pipe(**pipe_inputs)`` once under a :class:`RedundancyRecorder`."""
    cfg = pipe_inputs.get("guidance_scale", get_adapter(split_pipeline(pipe)[0]).default_guidance_scale) > 1
    with RedundancyRecorder(pipe, cfg=cfg, **recorder_kwargs) as recorder, torch.no_grad():
        pipe(**pipe_inputs)
    return recorder.stats()


# ----------------------------------------------------------------------------- Hydra entry point

def plan_figure_name(plan) -> str:
    """``plan_{model}_{solver}_{technique}_delta{threshold}``: a sweep's heatmaps sort side by side."""
    s = plan.search
    return (f"plan_{s.get('model_name', plan.model.get('class_name', 'model'))}_{s.get('solver', 'solver')}_"
            f"{s.get('technique', 'all')}_delta{s.get('threshold', 0):.3f}")


def plan_heatmaps(plans_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """One heatmap per plan.json below ``plans_dir`` (e.g. one per threshold of a sweep)."""
    from fastattn import CompressionPlan

    from .heatmaps import plan_heatmap

    plans_dir = Path(plans_dir)
    if not plans_dir.is_dir():
        raise FileNotFoundError(f"plans_dir not found: {plans_dir}")
    written = []
    for path in sorted(plans_dir.rglob("plan.json")):
        plan = CompressionPlan.load(path)
        name = plan_figure_name(plan)
        written.append(plan_heatmap(plan, Path(out_dir) / f"{name}.png", title=name.removeprefix("plan_")))
    return written


def main_redundancy(cfg) -> dict:
    """Record one generation of the configured model, write figures and numbers, log them."""
    from experiments.conditions import Conditions, to_device
    from experiments.logger import start_logger
    from experiments.app import resolve_device
    from experiments.pipelines import build_pipeline

    from .figures import plot_all

    if cfg.plans_dir and not Path(cfg.plans_dir).is_dir():
        raise FileNotFoundError(f"plans_dir not found: {cfg.plans_dir}")
    if int(cfg.num_samples) < 1 or int(cfg.query_block) < 1 or int(cfg.locality_every) < 1:
        raise ValueError("num_samples, query_block and locality_every must be >= 1")
    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    pipe = build_pipeline(cfg.model, cfg.solver, device)
    inputs = Conditions(cfg.model).inputs(range(cfg.num_samples), int(cfg.seed), int(cfg.solver.num_steps),
                                          float(cfg.guidance_scale))
    stats = record_redundancy(pipe, to_device(inputs, device), window_fraction=float(cfg.window_fraction),
                              query_block=int(cfg.query_block), locality_every=int(cfg.locality_every))
    prefix = f"{cfg.model.name}_{cfg.solver.name}"
    stats.save(out_dir, prefix=prefix)
    figures = plot_all(stats, out_dir, prefix)
    if cfg.plans_dir:
        figures.update({p.stem: p for p in plan_heatmaps(cfg.plans_dir, out_dir)})
    summary = summarise_stats(stats)
    logger = start_logger(cfg, out_dir)
    try:
        logger.log(summary, images=figures)
    finally:
        logger.finish()
    for key, value in summary.items():
        print(f"{key:<40} {value:.4f}")
    print(f"figures and numbers: {out_dir}")
    return summary


def summarise_stats(stats: RedundancyStats) -> dict[str, float]:
    """The headline numbers: how local, how step-similar and how CFG-similar attention is."""
    return {
        "window_share_mean": float(stats.window_share.mean()),
        "window_share_max_head": float(stats.window_share.max()),
        "uniform_window_share": _uniform_share(stats.seq_len, stats.window_fraction),
        "step_cosine_mean": float(np.nanmean(stats.step_cosine)),
        "cfg_cosine_mean": float(np.nanmean(stats.cfg_cosine)) if np.isfinite(stats.cfg_cosine).any() else float("nan"),
        "residual_to_window_mse_ratio": float(np.nanmean(stats.residual_mse) / np.nanmean(stats.window_mse)),
    }


def _uniform_share(seq_len: int, window_fraction: float) -> float:
    """The window share if attention were uniform: what locality is measured against."""
    from fastattn.kernels import band_pairs

    return band_pairs(seq_len, window_half_width(seq_len, window_fraction)) / seq_len**2


def _hydra_main():
    import hydra

    import experiments.schema  # noqa: F401  (registers the config schemas)

    @hydra.main(version_base="1.3", config_path="../conf", config_name="redundancy")
    def entry(cfg) -> None:
        main_redundancy(cfg)

    entry()


if __name__ == "__main__":
    _hydra_main()
