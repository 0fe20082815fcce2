"""The redundancy statistics behind DiTFastAttn's Figures 3 and 4, as recorded by
``python -m experiments.redundancy``: the arrays, their files and their headline numbers.

- locality (Fig. 3a left): attention mass as a function of |query - key| distance per layer and
  head, and the share of it inside the WA-RS window;
- WA-RS (Fig. 3a right): MSE between consecutive steps of the window-attention output W and of
  the residual R = O - W;
- steps (Fig. 4a): cosine similarity of each layer's attention output with the previous step's;
- CFG (Fig. 4b): cosine similarity of the conditional and unconditional halves of the output.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fastattn.kernels import band_pairs, window_half_width
from fastattn.utils.io import atomic_write_bytes
from fastattn.utils.paths import path_inside

STEP_LAYER_STATISTICS = ("step_cosine", "window_mse", "residual_mse", "cfg_cosine")


@dataclass
class RedundancyStats:
    """The recorded statistics; NaN where a value does not exist (e.g. step 0 has no previous step)."""

    num_steps: int
    num_layers: int
    num_heads: int
    seq_len: int
    window_size: float
    cond_first: bool
    distance_mass: np.ndarray  # [layers, heads, seq_len]: mean attention mass at each |q - k|
    window_share: np.ndarray  # [layers, heads]: share of attention mass inside the window
    step_cosine: np.ndarray  # [steps, layers]: cos(output_t, output_{t-1})
    window_mse: np.ndarray  # [steps, layers]: MSE(W_t, W_{t-1})
    residual_mse: np.ndarray  # [steps, layers]: MSE(R_t, R_{t-1})
    cfg_cosine: np.ndarray  # [steps, layers]: cos(conditional half, unconditional half)

    def save(self, folder: str | Path, prefix: str = "redundancy") -> list[Path]:
        """``{prefix}.npz`` with every field, and one CSV per [steps, layers] statistic."""
        folder = Path(folder)
        buf = io.BytesIO()
        np.savez(buf, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        written = [atomic_write_bytes(path_inside(folder, f"{prefix}.npz"), buf.getvalue())]
        for name in STEP_LAYER_STATISTICS:
            rows = [[s] + [f"{v:.6g}" for v in row] for s, row in enumerate(getattr(self, name))]
            written.append(_write_csv(path_inside(folder, f"{prefix}_{name}.csv"),
                                      ["step"] + [f"layer_{l}" for l in range(self.num_layers)], rows))
        rows = [[l, h, f"{self.window_share[l, h]:.6g}"] for l in range(self.num_layers) for h in range(self.num_heads)]
        written.append(_write_csv(path_inside(folder, f"{prefix}_window_share.csv"), ["layer", "head", "window_share"], rows))
        return written

    @classmethod
    def load(cls, path: str | Path) -> "RedundancyStats":
        """The statistics from a ``save``d ``.npz``."""
        with np.load(path) as data:
            missing = [f.name for f in fields(cls) if f.name not in data]
            if missing:
                raise ValueError(f"{path}: not a redundancy statistics file (missing {', '.join(missing)})")
            values = {f.name: data[f.name] for f in fields(cls)}
        scalars = {"num_steps": int, "num_layers": int, "num_heads": int, "seq_len": int, "window_size": float,
                   "cond_first": bool}
        return cls(**{name: scalars[name](value) if name in scalars else value for name, value in values.items()})


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_bytes(path, text.getvalue().encode())


def summarise_stats(stats: RedundancyStats) -> dict[str, float]:
    """The headline numbers: how local, how step-similar and how CFG-similar attention is."""
    return {
        "window_share_mean": float(stats.window_share.mean()),
        "window_share_max_head": float(stats.window_share.max()),
        "uniform_window_share": _uniform_share(stats.seq_len, stats.window_size),
        "step_cosine_mean": float(np.nanmean(stats.step_cosine)),
        "cfg_cosine_mean": float(np.nanmean(stats.cfg_cosine)) if np.isfinite(stats.cfg_cosine).any() else float("nan"),
        "residual_to_window_mse_ratio": float(np.nanmean(stats.residual_mse) / np.nanmean(stats.window_mse)),
    }


def _uniform_share(seq_len: int, window_size: float) -> float:
    """The window share if attention were uniform: what locality is measured against."""
    return band_pairs(seq_len, window_half_width(seq_len, window_size)) / seq_len**2
