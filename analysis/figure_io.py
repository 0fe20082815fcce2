"""Matplotlib figures made and saved without pyplot, so no backend is switched under a notebook."""

from __future__ import annotations

import io
from pathlib import Path

from fastattn.utils.io import atomic_write_bytes


def new_figure(**subplots):
    """A figure outside pyplot: no backend switch, nothing left open in a notebook's state."""
    from matplotlib.figure import Figure

    figsize = subplots.pop("figsize")
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(**subplots)


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())
