"""The report of ``experiments.compare_caches``: its record as JSON, CSV and Markdown, PSNR against
compute (one line per method), and the matched-compute verdict issue 19 asks for: fastattn's best
row against the best hook's at each compute fraction (all written atomically)."""

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


# The compute range the comparison's targets name, and its grid (fractions of raw's block FLOPs)
MATCHED_RANGE = (0.30, 0.80)
MATCHED_STEP = 0.01
AHEAD_DB = 1.0       # "ahead": at least this many dB above the best hook
FID_MARGIN = 2.0     # "keeps FID": FID-small within raw's + this


def _side(row: dict) -> str | None:
    """'fastattn' (a plan, alone or stacked with a block cache), 'hook' (a diffusers hook alone), or
    None (raw, or a row without compute or PSNR)."""
    if row["key"] == "raw" or row.get("compute") is None or row.get("psnr_db") is None:
        return None
    return "fastattn" if row["key"].startswith("fastattn_") else "hook"


def _label(row: dict) -> str:
    return f"{row['method']} {row['setting']}".strip()


def best_within(rows: list[dict], compute: float) -> dict | None:
    """The row of highest PSNR among those costing at most ``compute``: what a user with that
    budget can pick."""
    fitting = [r for r in rows if r["compute"] <= compute + 1e-9]
    return max(fitting, key=lambda r: r["psnr_db"]) if fitting else None


def interpolated(rows: list[dict], compute: float) -> float | None:
    """The best PSNR at ``compute`` with the rows' front joined by straight lines: a stricter
    opponent than :func:`best_within`, crediting settings between the ones measured."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r["compute"], -r["psnr_db"])):
        if r["psnr_db"] > best:
            front.append(r)
            best = r["psnr_db"]
    value = best_within(rows, compute)
    value = value["psnr_db"] if value else None
    for a, b in zip(front, front[1:]):
        if a["compute"] <= compute <= b["compute"] and b["compute"] > a["compute"]:
            share = (compute - a["compute"]) / (b["compute"] - a["compute"])
            line = a["psnr_db"] + share * (b["psnr_db"] - a["psnr_db"])
            value = line if value is None else max(value, line)
    return value


def _lowest_keeping_fid(rows: list[dict], raw_fid: float | None) -> dict | None:
    if raw_fid is None:
        return None
    kept = [r for r in rows if r.get("fid_small") is not None and r["fid_small"] <= raw_fid + FID_MARGIN]
    return min(kept, key=lambda r: r["compute"]) if kept else None


def matched_compute(record: dict) -> dict | None:
    """fastattn's best row against the best hook's at each compute fraction of :data:`MATCHED_RANGE`
    (both the hooks as measured and joined by lines), the share of the range where fastattn
    matches them and where it is :data:`AHEAD_DB` ahead, and the lowest compute each side reaches
    with FID-small within raw's + :data:`FID_MARGIN`. None until both sides have a row."""
    sides: dict[str, list[dict]] = {"fastattn": [], "hook": []}
    for r in record["rows"]:
        if (side := _side(r)) is not None:
            sides[side].append(r)
    if not sides["fastattn"] or not sides["hook"]:
        return None
    low, high = MATCHED_RANGE
    points = []
    for i in range(int(round((high - low) / MATCHED_STEP)) + 1):
        c = round(low + i * MATCHED_STEP, 6)
        ours, theirs = best_within(sides["fastattn"], c), best_within(sides["hook"], c)
        strict = interpolated(sides["hook"], c)
        points.append({
            "compute": c,
            "fastattn": _label(ours) if ours else None, "fastattn_psnr_db": ours["psnr_db"] if ours else None,
            "hook": _label(theirs) if theirs else None, "hook_psnr_db": theirs["psnr_db"] if theirs else None,
            "fastattn_key": ours["key"] if ours else None, "hook_key": theirs["key"] if theirs else None,
            "hook_interpolated_psnr_db": strict,
        })

    def share(key: str, by: float) -> float:
        """Share of the grid where fastattn's best is at least ``by`` dB above ``key`` (a point where
        fastattn has no row counts against it; one where the hooks have none, for it)."""
        won = [p["fastattn_psnr_db"] is not None and (p[key] is None or p["fastattn_psnr_db"] >= p[key] + by)
               for p in points]
        return sum(won) / len(won)

    raw = next((r for r in record["rows"] if r["key"] == "raw"), {})
    fid = {side: _lowest_keeping_fid(rows, raw.get("fid_small")) for side, rows in sides.items()}
    return {
        "range": [low, high], "step": MATCHED_STEP, "ahead_db": AHEAD_DB, "points": points,
        "matches": share("hook_psnr_db", 0.0), "ahead": share("hook_psnr_db", AHEAD_DB),
        "matches_interpolated": share("hook_interpolated_psnr_db", 0.0),
        "ahead_interpolated": share("hook_interpolated_psnr_db", AHEAD_DB),
        "fid_margin": FID_MARGIN, "raw_fid_small": raw.get("fid_small"),
        "lowest_compute_keeping_fid": {side: ({"row": _label(r), "compute": r["compute"], "fid_small": r["fid_small"]}
                                              if r else None) for side, r in fid.items()},
    }


def _db(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def matched_markdown(summary: dict | None) -> list[str]:
    """The verdict and a table every 0.05 of compute."""
    if summary is None:
        return []
    low, high = summary["range"]
    lines = ["", f"### Matched compute ({low:.2f}–{high:.2f})", "",
             f"Best fastattn row (alone or stacked) against the best hook alone at each compute, both picked "
             f"among the rows costing at most that compute; *joined* credits the hooks with straight lines "
             f"between their measured settings. Over a grid of {summary['step']:g}: fastattn matches or beats "
             f"the hooks on {summary['matches']:.0%} of the range ({summary['matches_interpolated']:.0%} joined) "
             f"and is ≥ {summary['ahead_db']:g} dB ahead on {summary['ahead']:.0%} "
             f"({summary['ahead_interpolated']:.0%} joined)."]
    fid = summary["lowest_compute_keeping_fid"]
    if summary["raw_fid_small"] is not None:
        def where(side):
            r = fid[side]
            return "none" if r is None else f"{r['compute']:.3f} ({r['row']}, {r['fid_small']:.2f})"
        lines += ["", f"Lowest compute with FID-small within raw + {summary['fid_margin']:g} "
                      f"({summary['raw_fid_small']:.2f}): fastattn {where('fastattn')}; hooks {where('hook')}."]
    lines += ["", "| compute | best fastattn | PSNR | best hook | PSNR | joined | margin |", "|" + " --- |" * 7]
    every = max(1, int(round(0.05 / summary["step"])))
    for p in summary["points"][::every]:
        margin = (None if p["fastattn_psnr_db"] is None or p["hook_psnr_db"] is None
                  else p["fastattn_psnr_db"] - p["hook_psnr_db"])
        lines.append(f"| {p['compute']:.2f} | {p['fastattn'] or '–'} | {_db(p['fastattn_psnr_db'])} | "
                     f"{p['hook'] or '–'} | {_db(p['hook_psnr_db'])} | {_db(p['hook_interpolated_psnr_db'])} | "
                     f"{'–' if margin is None else f'{margin:+.2f}'} |")
    return lines


def markdown(record: dict) -> str:
    lines = [f"Cache methods on {record['model']} ({record['solver']}, {record['num_steps']} steps, CFG "
             f"{record['guidance_scale']:g}), {record['num_samples']} samples (batches of {record['batch_size']}, "
             f"seed {record['seed']}) on {record['device']}" + ("" if record.get("complete") else " — incomplete"),
             "",
             "compute: transformer-block FLOPs executed / raw's (both CFG halves); attention: the attention "
             "layers' FLOPs / raw's; PSNR / SSIM against the raw samples of the same seeds.",
             "", "| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(_cell(r, k) for k in COLUMNS) + " |" for r in record["rows"]]
    lines += matched_markdown(_summary(record))
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
        # fastattn with a block cache (a plan and a hook): square markers, unjoined (its rows mix cache
        # settings and thresholds: no one knob runs along them)
        stacked = any(r.get("cache") and r.get("plan_attn_flops_fraction") is not None for r in rows)
        ax.plot([r["compute"] for r in rows], [r["psnr_db"] for r in rows], marker="s" if stacked else "o",
                linestyle="none" if stacked else "-", color=color, label=method)
    summary = _summary(record)
    if summary is not None:  # the best row within each compute, per side: what the verdict compares
        grid = [p["compute"] for p in summary["points"]]
        for key, color, name in (("fastattn_psnr_db", "black", "best fastattn within compute"),
                                 ("hook_psnr_db", "0.6", "best hook within compute")):
            ax.step(grid, [p[key] if p[key] is not None else float("nan") for p in summary["points"]],
                    where="post", color=color, linewidth=2.5, alpha=0.5, label=name)
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


def _summary(record: dict) -> dict | None:
    """The record's matched-compute verdict: as written with it, or worked out from its rows."""
    return record["matched_compute"] if "matched_compute" in record else matched_compute(record)


def write_report(record: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    record = {**record, "matched_compute": matched_compute(record)}  # once, for the four files
    atomic_write_json(out_dir / "compare.json", record)
    atomic_write_bytes(out_dir / "compare.csv", table_csv(record).encode())
    atomic_write_bytes(out_dir / "compare.md", markdown(record).encode())
    plot(record, out_dir / "compare.png")
