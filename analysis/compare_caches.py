"""The report of ``experiments.compare_caches``: its record as JSON, CSV and Markdown, and PSNR
against compute, one line per method (all written atomically)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fastattn.utils.io import atomic_write_bytes, atomic_write_json

from .figure_io import new_figure, save_figure

COLUMNS = ("method", "setting", "compute", "attn_fraction", "psnr_db", "ssim", "fid_small", "is_small",
           "seconds_per_sample")
HEADERS = ("method", "setting", "compute", "attention", "PSNR (dB)", "SSIM", "FID-small", "IS-small", "s / sample")
DIGITS = {"compute": 3, "attn_fraction": 3, "psnr_db": 2, "ssim": 4, "fid_small": 2, "is_small": 2,
          "seconds_per_sample": 3}


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    return f"{value:.{DIGITS[key]}f}" if key in DIGITS else str(value)


def markdown(record: dict) -> str:
    lines = [f"Cache methods on {record['model']} ({record['solver']}, {record['num_steps']} steps, CFG "
             f"{record['guidance_scale']:g}), {record['num_samples']} samples (batches of {record['batch_size']}, "
             f"seed {record['seed']}) on {record['device']}" + ("" if record.get("complete") else " — incomplete"),
             "",
             "compute: transformer-block FLOPs executed / raw's (both CFG halves); attention: the attention "
             "layers' FLOPs / raw's; PSNR / SSIM against the raw samples of the same seeds.",
             "", "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(_cell(r, k) for k in COLUMNS) + " |" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def table_csv(record: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(("key",) + COLUMNS)
    for r in record["rows"]:
        writer.writerow([r["key"]] + ["" if r.get(k) is None else r[k] for k in COLUMNS])
    return out.getvalue()


def plot(record: dict, path: Path) -> Path:
    fig, ax = new_figure(figsize=(7, 4.5))
    methods: dict[str, list[dict]] = {}
    for r in record["rows"]:
        if r["key"] != "raw" and r.get("compute") is not None and r.get("psnr_db") is not None:
            methods.setdefault(r["method"], []).append(r)
    colors = [cm(i % 20) for i in range(len(methods))] if (cm := _colormap()) else [None] * len(methods)
    for (method, rows), color in zip(methods.items(), colors):
        rows = sorted(rows, key=lambda r: r["compute"])
        # fastattn with a block cache (a plan and a hook): dashed, square markers
        stacked = any(r.get("cache") and r.get("plan_attn_flops_fraction") is not None for r in rows)
        ax.plot([r["compute"] for r in rows], [r["psnr_db"] for r in rows], marker="s" if stacked else "o",
                linestyle="--" if stacked else "-", color=color, label=method)
    ax.set_xlabel("compute (block FLOPs executed / raw)")
    ax.set_ylabel("PSNR vs raw (dB)")
    ax.set_title(f"{record['model']}, {record['num_steps']} steps, {record['num_samples']} samples")
    ax.grid(alpha=0.3)
    if methods:  # beside the axes: a dozen methods cover the points inside
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _colormap():
    """tab20: one colour per method up to twenty (the default cycle repeats after ten)."""
    from matplotlib import colormaps

    return colormaps.get("tab20")


def write_report(record: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "compare.json", record)
    atomic_write_bytes(out_dir / "compare.csv", table_csv(record).encode())
    atomic_write_bytes(out_dir / "compare.md", markdown(record).encode())
    plot(record, out_dir / "compare.png")
