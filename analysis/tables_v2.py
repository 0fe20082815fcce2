"""DiTFastAttnV2's tables from the harness's ``metrics.json``: the main table and both ablations.

    python -m analysis.tables_v2 RUNS_DIR [--out OUT_DIR]

reads every ``metrics.json`` under RUNS_DIR (recursively) whose run used the head-wise search
(``technique=headwise``) and writes, in the V2 paper's layouts, into OUT_DIR (default
``RUNS_DIR/tables``), each as ``.md`` and ``.csv``:

- ``table_v2``: Model | Resolution | Threshold δ | Attention Sparsity | LPIPS | SSIM | HPSv2 | CLIP,
  from runs of the default method set (``search=headwise``) and head constraint (c = 1.5); an
  "Original" row per model comes from a run at δ = 0 (sparsity 0, no LPIPS/SSIM).
- ``table_v2_methods`` (``experiment=v2_ablation_methods``): Method Set | Attention Sparsity | LPIPS
  | SSIM | HPSv2, rows Original, AA only, AA + OC, + CFG Sharing, + Residual Sharing.
- ``table_v2_constraint`` (``experiment=v2_ablation_constraint``): Constraint Coefficient c |
  Sparsity | LPIPS | SSIM, rows No constraint, c=1, c=1.5, c=2.

LPIPS and SSIM compare against the raw model's samples with the same seeds. The paper's rows are
always shown; a cell without a run (or a run without that metric) is "–". When several runs land
in one cell, the most recent file is shown.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fastattn.utils.cli import ArgumentParser
from fastattn.utils.io import atomic_write_bytes

from .tables import MISSING, RunRecord, as_number, config_model_field, format_number, load_records

V2_MODELS = {"sd3_medium_1024": ("SD3-medium", 0), "flux_dev_1024": ("FLUX.1-dev", 1),
             "flux_dev_2048": ("FLUX.1-dev", 2)}  # paper name, row order
DEFAULT_METHOD_SET, DEFAULT_COEFFICIENT = "headwise", 1.5
METHOD_SETS = {"headwise_aa": "AA only", "headwise_aa_oc": "AA + OC", "headwise_aa_oc_cfg": "+ CFG Sharing",
               "headwise": "+ Residual Sharing"}  # search option -> the paper's row, in its order
COEFFICIENTS = {None: "No constraint", 1.0: "c=1", 1.5: "c=1.5", 2.0: "c=2"}


# ----------------------------------------------------------------------------- what a run was


def is_v2_run(record: RunRecord) -> bool:
    m = record.metrics
    return m.get("kind", "run") == "run" and m.get("technique") == "headwise"


def search_field(record: RunRecord, key: str, default: Any = None) -> Any:
    config = record.metrics.get("config")
    search = config.get("search") if isinstance(config, Mapping) else None
    return search.get(key, default) if isinstance(search, Mapping) else default


def method_set(record: RunRecord) -> str:
    return str(record.metrics.get("search") or DEFAULT_METHOD_SET)


def coefficient(record: RunRecord) -> float | None:
    return as_number(search_field(record, "head_coefficient", DEFAULT_COEFFICIENT))


def delta(record: RunRecord) -> float | None:
    return as_number(record.metrics.get("threshold"))


SKIP = object()  # a key function's "not in this table"


def latest(records: Sequence[RunRecord], key: Callable[[RunRecord], Any]) -> dict[Any, RunRecord]:
    """The most recent run for each key (runs whose key is SKIP are left out; None is a key)."""
    out: dict[Any, RunRecord] = {}
    for r in records:
        k = key(r)
        if k is not SKIP and (k not in out or r.recency > out[k].recency):
            out[k] = r
    return out


def cells(record: RunRecord | None, original: bool, *columns: tuple[str, int]) -> list[str]:
    """Sparsity, then each (metric, digits) column; the Original row has sparsity 0 and no
    comparison against itself."""
    if record is None:
        return [MISSING] * (1 + len(columns))
    m = record.metrics
    out = ["0" if original else format_number(m.get("attn_sparsity"), 2)]
    for key, digits in columns:
        out.append(MISSING if original and key in ("lpips", "ssim") else format_number(m.get(key), digits))
    return out


# ----------------------------------------------------------------------------- the tables


def main_table(records: Sequence[RunRecord]) -> list[list[str]]:
    runs = [r for r in records if method_set(r) == DEFAULT_METHOD_SET and coefficient(r) == DEFAULT_COEFFICIENT
            or delta(r) == 0]
    picks = latest(runs, lambda r: SKIP if delta(r) is None else (r.metrics.get("model"), delta(r)))
    rows = []
    for (model, d), r in sorted(picks.items(), key=lambda kv: (V2_MODELS.get(kv[0][0], (kv[0][0], 99))[1],
                                                                  kv[0][0], kv[0][1])):
        side = as_number(config_model_field(r, "resolution"))
        rows.append([V2_MODELS.get(model, (model,))[0], MISSING if side is None else f"{side:g}",
                     "Original" if d == 0 else f"δ={d:g}",
                     *cells(r, d == 0, ("lpips", 3), ("ssim", 3), ("hpsv2", 4), ("clip_score", 4))])
    return rows


def ablation_rows(records: Sequence[RunRecord], experiment: str, key: Callable[[RunRecord], Any],
                  labels: Mapping[Any, str], columns: Sequence[tuple[str, int]], original: bool) -> list[list[str]]:
    """One block per model that has runs of ``experiment``: the paper's rows in its order."""
    runs = [r for r in records if r.metrics.get("experiment") == experiment]
    rows = []
    for model in sorted({r.metrics.get("model") for r in runs}, key=lambda m: V2_MODELS.get(m, (m, 99))[1]):
        mine = [r for r in runs if r.metrics.get("model") == model]
        picks = latest(mine, key)
        name = V2_MODELS.get(model, (model,))[0]
        if original:  # from a delta = 0 run of the model, whichever experiment made it
            zero = latest([r for r in records if r.metrics.get("model") == model and delta(r) == 0],
                          lambda r: "original")
            rows.append([name, "Original", *cells(zero.get("original"), True, *columns)])
        for value, label in labels.items():
            rows.append([name, label, *cells(picks.get(value), False, *columns)])
    return rows


TABLES = {
    "table_v2": (["Model", "Resolution", "Threshold δ", "Attention Sparsity", "LPIPS↓", "SSIM↑", "HPSv2↑", "CLIP↑"],
                 main_table, "runs with search=headwise (e.g. experiment=v2_sd3_1024)"),
    "table_v2_methods": (["Model", "Method Set", "Attention Sparsity", "LPIPS↓", "SSIM↑", "HPSv2↑"],
                         lambda records: ablation_rows(records, "v2_ablation_methods", method_set, METHOD_SETS,
                                                       [("lpips", 3), ("ssim", 3), ("hpsv2", 4)], original=True),
                         "runs of experiment=v2_ablation_methods"),
    "table_v2_constraint": (["Model", "Constraint Coefficient c", "Sparsity", "LPIPS↓", "SSIM↑"],
                            lambda records: ablation_rows(records, "v2_ablation_constraint", coefficient, COEFFICIENTS,
                                                          [("lpips", 3), ("ssim", 3)], original=False),
                            "runs of experiment=v2_ablation_constraint"),
}


def build_tables(records: Sequence[RunRecord]) -> dict[str, list[list[str]]]:
    v2 = [r for r in records if is_v2_run(r)]
    return {name: rows(v2) for name, (_, rows, _) in TABLES.items()}


def to_markdown(name: str, rows: list[list[str]]) -> str:
    header, _, needs = TABLES[name]
    if not rows:
        return f"{name}: no data; needs metrics.json of {needs}\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(name: str, rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLES[name][0])
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis.tables_v2", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="folder searched recursively for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUNS_DIR/tables)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"RUNS_DIR: not a folder: {args.runs_dir}", file=sys.stderr)
        return 2
    tables = build_tables(load_records(args.runs_dir))
    out = args.out or args.runs_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    printed = []
    for name, rows in tables.items():
        markdown = to_markdown(name, rows)
        atomic_write_bytes(out / f"{name}.md", markdown.encode())
        atomic_write_bytes(out / f"{name}.csv", to_csv(name, rows).encode())
        printed.append(markdown)
    print("\n".join(printed), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
