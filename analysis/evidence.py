"""The evidence report from ``experiments.evidence``'s record: Markdown tables and a FLOPs plot.

Single techniques are compared with DiTFastAttn at matched attention FLOPs by linear interpolation
in the FLOPs fraction between a technique's measured sweep points; outside a technique's measured
range there is no number ("–"): nothing is extrapolated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastattn.utils.io import atomic_write_bytes, atomic_write_json

from .figure_io import new_figure, save_figure

COMBINED = "all"
FAST = "fast"  # DiTFastAttn's methods searched by the fast search (search=fast)
# Issue 28's bar for the fast search at Algorithm 1's FLOPs: PSNR at most this far below, FID-small this far above
FAST_PSNR_MARGIN_DB, FAST_FID_MARGIN = 0.5, 1.0
PSNR_CAP_DB = 100.0  # experiments.metrics.similarity.MAX_PSNR_DB: what identical images score
METRICS = ("fid_small", "is_small", "psnr_db", "ssim")
LABELS = {"all": "DiTFastAttn", "ast": "AST only", "wars": "WA-RS only", "asc": "ASC only",
          "wa": "WA (no residual)", "raw": "Raw", "budget": "Budget search", "budget_forecast": "Budget search + forecast",
          "budget_reuse": "Budget search, forecast + AST", "forecast": "Greedy, forecast + AST",
          "all_forecast": "DiTFastAttn + forecast", "fast": "DiTFastAttn, fast search"}
BUDGET = ("budget", "budget_forecast", "budget_reuse")  # search=budget rows: at a FLOPs budget, no threshold
MATCHED = ("ast", "wars", "asc")  # the single techniques compared at matched FLOPs (Figure 9 left)
GREEDY_FORECAST = ("forecast", "all_forecast")  # Algorithm 1 with forecast among its strategies


def label(technique: str) -> str:
    """A row's method name in tables and plots (a technique without one is shown by its config name)."""
    return LABELS.get(technique, technique)


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def technique_rows(rows: list[dict], technique: str) -> list[dict]:
    return [r for r in rows if r["technique"] == technique]


def interpolate_at(rows: list[dict], flops: float, key: str) -> float | None:
    """``key`` of a technique's sweep at ``flops``, linear between measured points; None outside them."""
    points = {}
    for r in rows:  # several thresholds can give the same plan: average the duplicates
        if r.get(key) is not None:
            points.setdefault(round(r["attn_flops_fraction"], 9), []).append(r[key])
    if not points:
        return None
    xs = np.array(sorted(points))
    ys = np.array([np.mean(points[x]) for x in xs])
    if not xs[0] - 1e-9 <= flops <= xs[-1] + 1e-9:
        return None
    return float(np.interp(flops, xs, ys))


def fast_against_greedy(rows: list[dict]) -> list[dict]:
    """Each Algorithm-1 row (delta > 0) against the fast search's sweep at its attention FLOPs:
    PSNR and FID-small interpolated, their differences, and whether the fast search is within
    FAST_PSNR_MARGIN_DB and FAST_FID_MARGIN of it. Where the sweep does not reach the row's FLOPs,
    its row with the best PSNR at fewer FLOPs stands in (``at``: its FLOPs; a comparison that
    favours Algorithm 1); None where it has none."""
    fast = technique_rows(rows, FAST)
    out = []
    for r in sorted(technique_rows(rows, COMBINED), key=lambda r: r["delta"]):
        if not r["delta"]:
            continue
        f, at = r["attn_flops_fraction"], None
        psnr, fid = (interpolate_at(fast, f, k) for k in ("psnr_db", "fid_small"))
        if psnr is None:
            cheaper = [x for x in fast if x["attn_flops_fraction"] <= f and x.get("psnr_db") is not None]
            if cheaper:
                best = max(cheaper, key=lambda x: x["psnr_db"])
                psnr, fid, at = best["psnr_db"], best.get("fid_small"), best["attn_flops_fraction"]
        d_psnr = None if psnr is None or r.get("psnr_db") is None else psnr - r["psnr_db"]
        d_fid = None if fid is None or r.get("fid_small") is None else fid - r["fid_small"]
        within = None if d_psnr is None or d_fid is None else bool(d_psnr >= -FAST_PSNR_MARGIN_DB
                                                                     and d_fid <= FAST_FID_MARGIN)
        out.append({"row": r, "psnr_db": psnr, "fid_small": fid, "d_psnr_db": d_psnr, "d_fid_small": d_fid,
                    "within": within, "at": at})
    return out


def _fast_markdown(rows: list[dict]) -> list[str]:
    fast = technique_rows(rows, FAST)
    if not fast:
        return []
    cols = ["At FLOPs of", "Attn FLOPs", "Algorithm 1 PSNR", "Fast PSNR", "Δ PSNR", "Algorithm 1 FID-small",
            "Fast FID-small", "Δ FID", "Within"]
    table = "| {} |\n|{}\n".format(" | ".join(cols), "---|" * len(cols))
    verdicts = fast_against_greedy(rows)
    for v in verdicts:
        r = v["row"]
        within = "–" if v["within"] is None else ("yes" if v["within"] else "no")
        fast_psnr = _fmt(v["psnr_db"]) + ("" if v["at"] is None else f" (at {v['at']:.3f})")
        table += (f"| {r['threshold'].upper()} | {r['attn_flops_fraction']:.3f} | {_fmt(r.get('psnr_db'))} | "
                  f"{fast_psnr} | {_fmt(v['d_psnr_db'])} | {_fmt(r.get('fid_small'))} | "
                  f"{_fmt(v['fid_small'])} | {_fmt(v['d_fid_small'])} | {within} |\n")
    cols = ["Search", "Threshold", "Attn FLOPs", "Search cost (raw generations)", "PSNR", "FID-small"]
    sweep = "| {} |\n|{}\n".format(" | ".join(cols), "---|" * len(cols))
    for t in (COMBINED, FAST):
        for r in sorted(technique_rows(rows, t), key=lambda r: r["delta"]):
            sweep += (f"| {'Algorithm 1' if t == COMBINED else 'fast'} | {r['threshold'].upper()} | "
                      f"{r['attn_flops_fraction']:.3f} | {_fmt(r.get('search_raw_generations'))} | "
                      f"{_fmt(r.get('psnr_db'))} | {_fmt(r.get('fid_small'))} |\n")
    judged = [v for v in verdicts if v["within"] is not None]
    return [f"**The fast search against Algorithm 1 at matched attention FLOPs** (the fast sweep interpolated "
            "at each Algorithm-1 row's FLOPs; outside its range, its best row at fewer FLOPs, marked 'at'; within: "
            f"PSNR at most {FAST_PSNR_MARGIN_DB:g} dB below and FID-small at most {FAST_FID_MARGIN:g} above). "
            f"Within on {sum(v['within'] for v in judged)} of {len(judged)} rows compared.\n", table,
            "**Both searches' sweeps and what each search cost**\n", sweep]


def _metric_cells(row: dict) -> list[str]:
    return [_fmt(row.get("fid_small")), _fmt(row.get("is_small")), _fmt(row.get("psnr_db")),
            _fmt(row.get("ssim"), 3)]


def searches_against_singles(rows: list[dict]) -> list[dict]:
    """Each row of a search beyond Algorithm 1 with V1's methods (forecast among the greedy's
    strategies, the budget search) against each single technique at that row's attention FLOPs:
    PSNR and FID-small interpolated on the technique's sweep, None where its sweep does not reach."""
    present = {r["technique"] for r in rows}
    singles = [t for t in MATCHED if t in present]
    out = []
    for search in (t for t in (*GREEDY_FORECAST, *BUDGET) if t in present):
        for r in sorted(technique_rows(rows, search), key=lambda r: r["attn_flops_fraction"]):
            f = r["attn_flops_fraction"]
            against = {t: {k: interpolate_at(technique_rows(rows, t), f, k) for k in ("psnr_db", "fid_small")}
                       for t in singles}
            compared = [v["psnr_db"] for v in against.values() if v["psnr_db"] is not None]
            out.append({"technique": search, "row": r, "against": against,
                        "beats_all": (r.get("psnr_db") is not None and bool(compared)
                                      and all(r["psnr_db"] > v for v in compared)),
                        "compared": len(compared)})
    return out


def _searches_markdown(rows: list[dict]) -> list[str]:
    verdicts = searches_against_singles(rows)
    if not verdicts:
        return []
    singles = list(verdicts[0]["against"])
    cols = ["Search", "Setting", "Attn FLOPs", "PSNR", *(f"{label(t)} PSNR" for t in singles), "Beats each"]
    table = "| {} |\n|{}\n".format(" | ".join(cols), "---|" * len(cols))
    for v in verdicts:
        r = v["row"]
        setting = f"budget {r['budget']:g}" if r.get("budget") is not None else str(r.get("threshold", "")).upper()
        beats = "–" if not v["compared"] else ("yes" if v["beats_all"] else "no")
        table += (f"| {label(v['technique'])} | {setting} | {r['attn_flops_fraction']:.3f} | {_fmt(r.get('psnr_db'))} | "
                  + " | ".join(_fmt(v["against"][t]["psnr_db"]) for t in singles) + f" | {beats} |\n")
    compared = [v for v in verdicts if v["compared"]]
    by_search = {}
    for v in compared:
        won, total = by_search.get(v["technique"], (0, 0))
        by_search[v["technique"]] = (won + v["beats_all"], total + 1)
    summary = "; ".join(f"{label(t)} {won} of {total}" for t, (won, total) in by_search.items()) or "none"
    dominated = "; ".join(f"{label(t)} {won} of {total}" for t, (won, total) in dominated_singles(rows).items())
    return ["**The searches beyond Algorithm 1 against every single technique at matched attention FLOPs** "
            "(PSNR; each single technique interpolated on its sweep, – where its sweep does not reach the "
            f"row's FLOPs). Rows beating every single technique that reaches them: {summary}. Single-technique "
            f"points a row of the search dominates (no more FLOPs, higher PSNR): {dominated}.\n", table]


def dominated_singles(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per search: how many of the single techniques' measured points one of its rows dominates (at
    most their attention FLOPs, higher PSNR), out of all of them: the comparison where a technique's
    sweep lies outside the search's FLOPs range (WA-RS and ASC alone cannot go as low)."""
    present = {r["technique"] for r in rows}
    points = [r for t in MATCHED if t in present for r in technique_rows(rows, t) if r.get("psnr_db") is not None]
    out = {}
    for search in (t for t in (*GREEDY_FORECAST, *BUDGET) if t in present):
        mine = [r for r in technique_rows(rows, search) if r.get("psnr_db") is not None]
        won = sum(any(m["attn_flops_fraction"] <= p["attn_flops_fraction"] + 1e-9 and m["psnr_db"] > p["psnr_db"]
                      for m in mine) for p in points)
        out[search] = (won, len(points))
    return out


def markdown(record: dict) -> str:
    rows = record["rows"]
    head = "| {} |\n|{}\n"
    lines = [f"Model {record['model']}, {record['solver']} with {record['num_steps']} steps, CFG scale "
             f"{record['guidance_scale']}, {record['num_samples']} samples per row (same seeds), FID-small against "
             f"{record['reference_crops']} seeded real crops. PSNR (dB) / SSIM against the raw samples."
             + (" **Incomplete run: rows still missing.**" if record.get("complete") is False else "") + "\n"]
    cols = ["Method", "Threshold", "Attn FLOPs", "FID-small", "IS-small", "PSNR", "SSIM"]
    table = head.format(" | ".join(cols), "---|" * len(cols))
    combined = sorted(technique_rows(rows, COMBINED), key=lambda r: r["delta"])
    for r in technique_rows(rows, "raw") + combined:
        threshold = "–" if r["delta"] is None else f"{r['threshold'].upper()} (δ={r['delta']:g})"
        table += f"| {label(r['technique'])} | {threshold} | {r['attn_flops_fraction']:.3f} | " \
                 + " | ".join(_metric_cells(r)) + " |\n"
    lines += ["**DiTFastAttn at D0…D6**\n", table]

    present = {r["technique"] for r in rows}
    singles = sorted(present - {"raw", COMBINED, FAST, *BUDGET})
    matched = [t for t in (*BUDGET, *GREEDY_FORECAST, *MATCHED) if t in present]
    if matched:
        cols = ["At FLOPs of", "Attn FLOPs", "Method", "FID-small", "IS-small", "PSNR", "SSIM"]
        table = head.format(" | ".join(cols), "---|" * len(cols))
        for r in combined:
            if r["delta"] == 0:
                continue
            f = r["attn_flops_fraction"]
            table += f"| {r['threshold'].upper()} | {f:.3f} | DiTFastAttn | " + " | ".join(_metric_cells(r)) + " |\n"
            for t in matched:
                cells = {k: interpolate_at(technique_rows(rows, t), f, k) for k in METRICS}
                table += f"| | | {label(t)} | " + " | ".join(_metric_cells(cells)) + " |\n"
        lines += ["**Single techniques at matched attention FLOPs** (Figure 9 left; linear interpolation "
                  "between each technique's measured sweep points, – where the FLOPs lie outside that range)\n",
                  table]
    budgets = [t for t in BUDGET if t in present]
    if budgets:
        cols = ["Budget", "Attn FLOPs", "Method", "FID-small", "IS-small", "PSNR", "SSIM"]
        table = head.format(" | ".join(cols), "---|" * len(cols))
        for t in budgets:
            for r in sorted(technique_rows(rows, t), key=lambda r: r["budget"]):
                f = r["attn_flops_fraction"]
                table += f"| {r['budget']:g} | {f:.3f} | {label(t)} | " + " | ".join(_metric_cells(r)) + " |\n"
                for other in (COMBINED, *[m for m in MATCHED if m in present]):
                    cells = {k: interpolate_at(technique_rows(rows, other), f, k) for k in METRICS}
                    table += f"| | | {label(other)} | " + " | ".join(_metric_cells(cells)) + " |\n"
        lines += ["**The budget search at matched attention FLOPs** (search=budget: V1's methods chosen step by "
                  "step by V2's integer program on measured per-layer errors; the others interpolated as above)\n",
                  table]
    lines += _fast_markdown(rows)
    lines += _searches_markdown(rows)
    if singles:
        cols = ["Method", "Threshold", "Attn FLOPs", "FID-small", "IS-small", "PSNR", "SSIM"]
        table = head.format(" | ".join(cols), "---|" * len(cols))
        for t in singles:
            for r in sorted(technique_rows(rows, t), key=lambda r: r["delta"]):
                table += f"| {label(t)} | {r['threshold'].upper()} | {r['attn_flops_fraction']:.3f} | " \
                         + " | ".join(_metric_cells(r)) + " |\n"
        lines += ["**Measured sweep points of the single techniques** (WA vs WA-RS is Figure 9 right)\n", table]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> Path:
    fig, axes = new_figure(ncols=2, figsize=(10, 4))
    rows = record["rows"]
    raw = technique_rows(rows, "raw")
    for technique in [COMBINED] + sorted({r["technique"] for r in rows} - {"raw", COMBINED}):
        points = sorted(technique_rows(rows, technique), key=lambda r: r["attn_flops_fraction"])
        xs = [r["attn_flops_fraction"] for r in points]
        axes[0].plot(xs, [r["fid_small"] for r in points], "o-", label=label(technique))
        finite = [r for r in points if r.get("psnr_db") is not None and r["psnr_db"] < PSNR_CAP_DB]
        axes[1].plot([r["attn_flops_fraction"] for r in finite], [r["psnr_db"] for r in finite], "o-",
                     label=label(technique))  # identical samples (D0) sit at the PSNR cap: left out
    if raw:
        axes[0].axhline(raw[0]["fid_small"], color="gray", ls="--", label="Raw")
    axes[0].set(xlabel="attention FLOPs fraction", ylabel="FID-small (lower is better)")
    axes[1].set(xlabel="attention FLOPs fraction", ylabel="PSNR vs raw, dB (higher is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{record['model']}, {record['num_steps']}-step {record['solver']}, CFG {record['guidance_scale']}, "
                 f"{record['num_samples']} samples")
    return save_figure(fig, path)


def write_report(record: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "evidence.json", record)
    atomic_write_bytes(out_dir / "evidence.md", markdown(record).encode())
    plot(record, out_dir / "evidence.png")
