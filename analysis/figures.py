"""Figures of the redundancy statistics (DiTFastAttn Figures 3 and 4), as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastattn.utils.paths import path_inside

from .figure_io import new_figure, save_figure
from .redundancy import RedundancyStats


def _layer_step_heatmap(ax, values: np.ndarray, title: str, vmin=None, vmax=None, cmap="viridis"):
    image = ax.imshow(values.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return image


def plot_locality(stats: RedundancyStats, path: str | Path) -> Path:
    """Left: attention mass against |q - k| per layer (mean over heads), the window edge dashed.
    Right: share of the mass inside the window per layer and head."""
    from matplotlib import colormaps

    fig, (left, right) = new_figure(nrows=1, ncols=2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    distances = np.arange(stats.seq_len)
    colours = colormaps["viridis"](np.linspace(0, 1, stats.num_layers))
    for l in range(stats.num_layers):
        left.plot(distances, stats.distance_mass[l].mean(0), color=colours[l], lw=1, label=f"layer {l}")
    from fastattn.kernels import window_half_width

    left.axvline(window_half_width(stats.seq_len, stats.window_size), color="k", ls="--", lw=1, label="window")
    left.set_yscale("log")
    left.set_xlabel("|query - key| in the flattened token sequence")
    left.set_ylabel("attention mass")
    left.set_title("attention locality")
    if stats.num_layers <= 12:
        left.legend(fontsize=7, ncol=2)
    image = right.imshow(stats.window_share, aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    right.set_xlabel("head")
    right.set_ylabel("layer")
    right.set_title(f"mass inside the {stats.window_size:g} window")
    fig.colorbar(image, ax=right)
    return save_figure(fig, path)


def plot_wars_mse(stats: RedundancyStats, path: str | Path) -> Path:
    """MSE between consecutive steps of the window output W and of the residual R = O - W."""
    fig, ax = new_figure(figsize=(6.5, 3.8))
    steps = np.arange(1, stats.num_steps)  # step 0 has no previous step
    for name, colour, label in (("window_mse", "#e6a817", "window attention W"),
                                ("residual_mse", "#1f77b4", "residual R = O - W")):
        values = getattr(stats, name)[1:]
        for l in range(stats.num_layers):
            ax.plot(steps, values[:, l], color=colour, alpha=0.15, lw=0.8)
        ax.plot(steps, values.mean(axis=1), color=colour, lw=2, label=f"{label} (mean over layers)")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("MSE to the previous step")
    ax.set_title("WA-RS: the residual changes less than the window output")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_step_similarity(stats: RedundancyStats, path: str | Path) -> Path:
    fig, ax = new_figure(figsize=(7, 3.8))
    image = _layer_step_heatmap(ax, stats.step_cosine, "cosine similarity of attention outputs with the previous step")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def plot_cfg_similarity(stats: RedundancyStats, path: str | Path) -> Path:
    fig, ax = new_figure(figsize=(7, 3.8))
    image = _layer_step_heatmap(ax, stats.cfg_cosine, "cosine similarity of conditional and unconditional outputs")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


FIGURES = {"locality": plot_locality, "wars_mse": plot_wars_mse, "step_similarity": plot_step_similarity,
           "cfg_similarity": plot_cfg_similarity}


def plot_all(stats: RedundancyStats, folder: str | Path, prefix: str) -> dict[str, Path]:
    """Every figure as ``{prefix}_{figure}.png``, so a sweep's figures line up by name."""
    folder = Path(folder)
    return {name: plot(stats, path_inside(folder, f"{prefix}_{name}.png")) for name, plot in FIGURES.items()}
