"""Plan heatmaps: step x layer coloured by method (the paper's Figures 5 and 11-13)."""

from __future__ import annotations

from pathlib import Path

from fastattn.methods import Method
from fastattn.plan import CompressionPlan
from fastattn.utils.io import atomic_write_bytes

METHOD_COLOURS = {
    Method.FULL: "#d9d9d9",
    Method.AST: "#1f77b4",
    Method.WARS_ASC: "#2ca02c",
    Method.WARS: "#98df8a",
    Method.ASC: "#ff7f0e",
    Method.WA: "#c5b0d5",
}


def plan_heatmap(plan: CompressionPlan, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of the plan: one row per layer, one column per step, a colour per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    order = list(METHOD_COLOURS)
    grid = [[order.index(plan.methods[s][l]) for s in range(plan.num_steps)] for l in range(plan.num_layers)]
    fig, ax = plt.subplots(figsize=(max(4.0, plan.num_steps * 0.18 + 2), max(2.5, plan.num_layers * 0.18 + 1.2)))
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
