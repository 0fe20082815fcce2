"""Which rows of a compare_caches run the equal-quality benchmark times, and where their traces are.

The rule (:func:`select_rows`): the reference is the peer row (a diffusers hook or cache-dit alone)
of best PSNR among those at compute <= the target; its PSNR is P*. Each method group (one
``method`` string: a hook, cache-dit, a fastattn technique, a stack) is represented by its
lowest-compute row with PSNR >= P*; a group with none is "not reached". Timed: raw, the
reference, and each group's pick.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..infra.app import ConfigError

RAW, FASTATTN, STACKED, PEER = "raw", "fastattn", "stacked", "peer"
COMPARE = "compare.json"
RUN_COMPARE = "python -m experiments.compare_caches hydra.run.dir=<dir>"


def side(row: dict) -> str:
    """RAW, FASTATTN (a plan alone), STACKED (a plan with a block cache) or PEER (a hook or cache-dit
    alone). fastattn rows' keys start with ``fastattn_`` (compare_caches.comparison_rows); a stack
    also has its block cache's ``cache`` spec. Method strings cannot tell them apart: fastattn's own
    labels contain " + " too ("fastattn forecast + AST")."""
    if row["key"] == "raw":
        return RAW
    if row["key"].startswith("fastattn_"):
        return STACKED if row.get("cache") else FASTATTN
    return PEER


def _measured(row: dict) -> bool:
    return row.get("compute") is not None and row.get("psnr_db") is not None


def select_rows(rows: list[dict], compute_target: float) -> dict:
    """The reference, P*, each method group's pick (None: not reached) and the rows to time, in
    order: raw, the reference, then the picks as the groups first appear (each row once)."""
    by_key = {r["key"]: r for r in rows}
    raw = by_key.get("raw")
    if raw is None:
        raise ConfigError("comparison: compare.json has no raw row")
    peers = [r for r in rows if side(r) == PEER and _measured(r) and r["compute"] <= compute_target]
    if not peers:
        raise ConfigError(f"comparison: no peer row (a hook or cache-dit alone) at compute <= {compute_target:g}; "
                          "raise compute_target or add cheaper peer settings to compare_caches")
    reference = max(peers, key=lambda r: (r["psnr_db"], -r["compute"]))
    target = reference["psnr_db"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if side(r) != RAW and _measured(r):
            groups.setdefault(r["method"], []).append(r)
    picks = []
    for method, members in groups.items():
        reached = [r for r in members if r["psnr_db"] >= target]
        pick = min(reached, key=lambda r: (r["compute"], -r["psnr_db"])) if reached else None
        picks.append({"method": method, "side": side(members[0]), "pick": pick["key"] if pick else None})
    timed_keys = ["raw", reference["key"]] + [p["pick"] for p in picks if p["pick"]]
    timed = [by_key[k] for k in dict.fromkeys(timed_keys)]
    return {"compute_target": compute_target, "reference": reference["key"], "psnr_target_db": target,
            "groups": picks, "timed": timed}


def load_rows(comparison: str | Path, seed: int) -> tuple[Path, list[dict]]:
    """(the seed's folder, its rows) of a compare_caches run directory; a one-line error naming
    what to run where the run or the seed is missing."""
    run = Path(comparison)
    if not run.is_dir():
        raise ConfigError(f"comparison: no folder {run}; run {RUN_COMPARE} first and give comparison=<dir>")
    path = run / f"seed{seed}" / COMPARE
    if not path.is_file():
        raise ConfigError(f"comparison: {path} not found; run {RUN_COMPARE.replace('<dir>', str(run))} "
                          f"seeds=[{seed}] (or pick another seed=)")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"comparison: {path} is not a compare_caches table ({error})") from None
    return path.parent, rows


def trace_paths(seed_dir: Path, rows: list[dict]) -> dict[str, Path]:
    """Each row's decision trace (raw needs none: it runs unmodified); a one-line error naming the
    rows without one."""
    missing = [r["key"] for r in rows if side(r) != RAW
               and not (r.get("trace") and (seed_dir / r["trace"]).is_file())]
    if missing:
        raise ConfigError(f"comparison: rows without a decision trace (samples/<row>/trace.json): {', '.join(missing)}; "
                          f"rows finished before traces existed keep none: run {RUN_COMPARE.replace('<dir>', '<a new dir>')}")
    return {r["key"]: seed_dir / r["trace"] for r in rows if side(r) != RAW}


__all__ = ["FASTATTN", "PEER", "RAW", "STACKED", "load_rows", "select_rows", "side", "trace_paths"]
