"""Plan heatmaps: step x layer coloured by method (the paper's Figures 5 and 11-13), and the
head-wise view of DiTFastAttnV2 plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastattn.headwise.plan import HeadPlan
from fastattn.layerwise.methods import Method
from fastattn.plan import CompressionPlan
from fastattn.utils.paths import path_inside, slug

from .figure_io import new_figure, save_figure

METHOD_COLOURS = {
    Method.FULL: "#d9d9d9",
    Method.AST: "#1f77b4",
    Method.FORECAST: "#17becf",
    Method.WARS_ASC: "#2ca02c",
    Method.WARS: "#98df8a",
    Method.ASC: "#ff7f0e",
    Method.WA: "#c5b0d5",
}
_V1_NAMES = {m.value for m in Method}


def plan_heatmap(plan: CompressionPlan, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of the plan: one row per layer (per head of a head-wise plan), one column per
    step, a colour per method."""
    if isinstance(plan, HeadPlan):
        return headwise_heatmap(plan.to_dict()["heads"], path, title=title or "head-wise plan")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    order = list(METHOD_COLOURS)
    grid = [[order.index(plan.methods[s][l]) for s in range(plan.num_steps)] for l in range(plan.num_layers)]
    fig, ax = new_figure(figsize=(max(4.0, plan.num_steps * 0.18 + 2), max(2.5, plan.num_layers * 0.18 + 1.2)))
    ax.imshow(grid, cmap=ListedColormap([METHOD_COLOURS[m] for m in order]), vmin=0, vmax=len(order) - 1,
              aspect="auto", interpolation="nearest")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    flops = plan.attention_flops()["fraction"] if plan.model.get("seq_len") else None
    default_title = f"plan (attention FLOPs {flops:.0%})" if flops is not None else "plan"
    ax.set_title(title or default_title)
    counts = plan.counts()
    ax.legend(handles=[Patch(color=METHOD_COLOURS[m], label=f"{m.value} ({counts[m.value]})") for m in order],
              bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, frameon=False)
    return save_figure(fig, path)


def headwise_heatmap(methods, path: str | Path, title: str = "head-wise plan") -> Path:
    """Head-wise view (DiTFastAttnV2): ``methods[step][layer][head]`` names, one row per (layer, head),
    layers separated by lines. Any method names work; V1 names keep their colours."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = np.asarray(methods, dtype=object)
    if grid.ndim != 3:
        raise ValueError(f"methods: expected [step][layer][head], got {grid.ndim} dimensions")
    steps, layers, heads = grid.shape
    names = sorted({str(m) for m in grid.flat}, key=lambda n: (n not in _V1_NAMES, n))
    palette = colormaps["tab20"](np.linspace(0, 1, 20))
    colours = [METHOD_COLOURS[Method(n)] if n in _V1_NAMES else palette[i % 20] for i, n in enumerate(names)]
    index = np.vectorize(lambda m: names.index(str(m)))(grid)  # [steps, layers, heads]
    image = index.transpose(1, 2, 0).reshape(layers * heads, steps)
    fig, ax = new_figure(figsize=(max(4.0, steps * 0.18 + 2), max(3.0, layers * heads * 0.06 + 1.5)))
    ax.imshow(image, cmap=ListedColormap(colours), vmin=0, vmax=len(names) - 1, aspect="auto",
              interpolation="nearest")
    for l in range(1, layers):
        ax.axhline(l * heads - 0.5, color="white", lw=0.8)
    ax.set_yticks([l * heads + heads / 2 - 0.5 for l in range(layers)], [str(l) for l in range(layers)])
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer (rows: heads)")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=n) for n, c in zip(names, colours, strict=True)],
              bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, frameon=False)
    return save_figure(fig, path)


def plan_figure_name(plan: CompressionPlan) -> str:
    """``plan_{model}_{solver}_{technique}_delta{threshold}``: a sweep's heatmaps sort side by side.
    The fields come from the plan file, so the name is a :func:`slug` (no folder in it)."""
    s = plan.search
    threshold = s.get("threshold", 0)
    delta = f"{threshold:.3f}" if isinstance(threshold, (int, float)) else threshold
    return slug(f"plan_{s.get('model_name', plan.model.get('class_name', 'model'))}_{s.get('solver', 'solver')}_"
                f"{s.get('technique', 'all')}_delta{delta}")


def plan_heatmaps(plans_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """One heatmap per plan.json below ``plans_dir`` (e.g. one per threshold of a sweep), each in
    ``out_dir``; plans whose names coincide get ``_2``, ``_3``, ... rather than overwriting."""
    plans_dir = Path(plans_dir)
    if not plans_dir.is_dir():
        raise FileNotFoundError(f"plans_dir not found: {plans_dir}")
    written, taken = [], set()
    for path in sorted(plans_dir.rglob("plan.json")):
        plan = CompressionPlan.load(path)
        name = unique_name(plan_figure_name(plan), taken)
        figure = path_inside(out_dir, f"{name}.png")
        written.append(plan_heatmap(plan, figure, title=name.removeprefix("plan_")))
    return written


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... when already in ``taken``; the result is added to it."""
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    taken.add(unique)
    return unique
