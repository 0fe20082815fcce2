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

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .table_model import (
    MISSING,
    SKIP,
    RunRecord,
    Table,
    as_number,
    config_field,
    config_model_field,
    format_number,
    latest_per_key,
    plain_header,
    table_main,
)

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


def method_set(record: RunRecord) -> str:
    return str(record.metrics.get("search") or DEFAULT_METHOD_SET)


def coefficient(record: RunRecord) -> float | None:
    return as_number(config_field(record, "search", "head_coefficient", DEFAULT_COEFFICIENT))


def delta(record: RunRecord) -> float | None:
    return as_number(record.metrics.get("threshold"))


def latest(records: Sequence[RunRecord], key: Callable[[RunRecord], Any]) -> dict[Any, RunRecord]:
    """The most recent run for each key (runs whose key is SKIP are left out; None is a key)."""
    return {k: pick.run for k, pick in latest_per_key(records, key).items()}


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


def main_rows(records: Sequence[RunRecord]) -> list[list[str]]:
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


@dataclass(frozen=True)
class Ablation:
    """One ablation table: the runs of ``experiment``, a row per value of ``key`` (the paper's
    ``labels``, in its order), the metric ``columns`` after sparsity, and whether an Original row leads."""

    experiment: str
    key: Callable[[RunRecord], Any]
    labels: Mapping[Any, str]
    columns: tuple[tuple[str, int], ...]
    original: bool

    def __call__(self, records: Sequence[RunRecord]) -> list[list[str]]:
        """One block per model that has runs of the experiment."""
        runs = [r for r in records if r.metrics.get("experiment") == self.experiment]
        rows = []
        for model in sorted({r.metrics.get("model") for r in runs}, key=lambda m: V2_MODELS.get(m, (m, 99))[1]):
            picks = latest([r for r in runs if r.metrics.get("model") == model], self.key)
            name = V2_MODELS.get(model, (model,))[0]
            if self.original:  # from a delta = 0 run of the model, whichever experiment made it
                zero = latest([r for r in records if r.metrics.get("model") == model and delta(r) == 0],
                              lambda r: "original")
                rows.append([name, "Original", *cells(zero.get("original"), True, *self.columns)])
            for value, label in self.labels.items():
                rows.append([name, label, *cells(picks.get(value), False, *self.columns)])
        return rows


# name -> (header, rows from the V2 runs, which runs it needs)
TABLES: dict[str, tuple[list[str], Callable[[Sequence[RunRecord]], list[list[str]]], str]] = {
    "table_v2": (["Model", "Resolution", "Threshold δ", "Attention Sparsity", "LPIPS↓", "SSIM↑", "HPSv2↑", "CLIP↑"],
                 main_rows, "runs with search=headwise (e.g. experiment=v2_sd3_1024)"),
    "table_v2_methods": (["Model", "Method Set", "Attention Sparsity", "LPIPS↓", "SSIM↑", "HPSv2↑"],
                         Ablation("v2_ablation_methods", method_set, METHOD_SETS,
                                  (("lpips", 3), ("ssim", 3), ("hpsv2", 4)), original=True),
                         "runs of experiment=v2_ablation_methods"),
    "table_v2_constraint": (["Model", "Constraint Coefficient c", "Sparsity", "LPIPS↓", "SSIM↑"],
                            Ablation("v2_ablation_constraint", coefficient, COEFFICIENTS,
                                     (("lpips", 3), ("ssim", 3)), original=False),
                            "runs of experiment=v2_ablation_constraint"),
}


def build_tables(records: Sequence[RunRecord]) -> dict[str, Table]:
    """The three V2 tables, keyed by name, in the V2 paper's compact layout."""
    v2 = [r for r in records if is_v2_run(r)]
    return {name: Table(name, "", "", header=[plain_header(*header)], rows=rows(v2), compact=True,
                        empty_message=f"{name}: no data; needs metrics.json of {needs}")
            for name, (header, rows, needs) in TABLES.items()}


def main(argv: Sequence[str] | None = None) -> int:
    return table_main(argv, "python -m analysis.tables_v2", __doc__, build_tables, (".md", ".csv"))


if __name__ == "__main__":
    sys.exit(main())
