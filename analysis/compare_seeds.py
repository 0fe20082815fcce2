"""The comparison's verdict on each sample seed, and held out: the settings one seed picks (fastattn's
best and the best peer's at each compute) judged on another seed's samples, so that no setting is
judged on the seed it was chosen on. Written as ``seeds.json`` and ``seeds.md``."""

from __future__ import annotations

from pathlib import Path

from fastattn.utils.io import atomic_write_bytes, atomic_write_json

from .compare_caches import AHEAD_DB, matched_compute


def _share(points: list[dict], by: float) -> float | None:
    """Share of the points where fastattn's pick is at least ``by`` dB above the peer's (no fastattn
    pick counts against it, no peer pick for it)."""
    if not points:
        return None
    won = [p["fastattn_psnr_db"] is not None
           and (p["hook_psnr_db"] is None or p["fastattn_psnr_db"] >= p["hook_psnr_db"] + by) for p in points]
    return sum(won) / len(won)


def judged_on(chosen: dict, record: dict) -> list[dict]:
    """The picks of a verdict (``chosen``, :func:`~analysis.compare_caches.matched_compute`) with the
    PSNR their rows have in ``record``; a pick ``record`` lacks is no pick."""
    psnr = {r["key"]: r.get("psnr_db") for r in record["rows"]}
    return [{"compute": p["compute"], "fastattn": p["fastattn"], "hook": p["hook"],
             "fastattn_psnr_db": psnr.get(p["fastattn_key"]), "hook_psnr_db": psnr.get(p["hook_key"])}
            for p in chosen["points"]]


def held_out(records: dict[int, dict]) -> dict:
    """Per seed its own verdict; per ordered pair of seeds (chosen on, judged on) the picks of the first
    judged on the second."""
    verdicts = {seed: matched_compute(record) for seed, record in records.items()}
    per_seed = [{"seed": seed, "matches": v["matches"], "ahead": v["ahead"],
                 "matches_interpolated": v["matches_interpolated"]} if v else {"seed": seed}
                for seed, v in verdicts.items()]
    pairs = []
    for chosen_on, verdict in verdicts.items():
        for seed, record in records.items():
            if seed == chosen_on or verdict is None:
                continue
            points = judged_on(verdict, record)
            pairs.append({"chosen_on": chosen_on, "judged_on": seed, "matches": _share(points, 0.0),
                          "ahead": _share(points, AHEAD_DB), "points": points})
    return {"ahead_db": AHEAD_DB, "per_seed": per_seed, "held_out": pairs}


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def markdown(summary: dict) -> str:
    lines = ["### Verdict per seed and held out", "",
             "Share of compute 0.30–0.80 where fastattn's best row matches or beats the best peer's (hooks "
             "and cache-dit), and where it is ≥ " f"{summary['ahead_db']:g} dB ahead. *Held out*: the rows each "
             "side picks at each compute on one seed, judged by their PSNR on the other seed.", "",
             "| rows picked on | judged on | matches or beats | ahead | joined |", "| --- | --- | --- | --- | --- |"]
    for v in summary["per_seed"]:
        lines.append(f"| seed {v['seed']} | seed {v['seed']} | {_pct(v.get('matches'))} | {_pct(v.get('ahead'))} | "
                     f"{_pct(v.get('matches_interpolated'))} |")
    for p in summary["held_out"]:
        lines.append(f"| seed {p['chosen_on']} | seed {p['judged_on']} | {_pct(p['matches'])} | "
                     f"{_pct(p['ahead'])} | – |")
    return "\n".join(lines) + "\n"


def write_seeds_report(records: dict[int, dict], out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    summary = held_out(records)
    atomic_write_json(out_dir / "seeds.json", summary)
    atomic_write_bytes(out_dir / "seeds.md", markdown(summary).encode())
    return summary
