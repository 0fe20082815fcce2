"""DiTFastAttnV2's main table (SD3 / FLUX quality per threshold) from the harness's ``metrics.json``.

    python -m analysis.tables_v2 RUNS_DIR [--out OUT_DIR]

reads every ``metrics.json`` under RUNS_DIR (recursively) whose run used the head-wise search
(``technique=headwise``), and writes ``table_v2.md`` and ``table_v2.csv`` into OUT_DIR (default
``RUNS_DIR/tables``) in the V2 paper's layout: Model | Resolution | Threshold δ | Attention
Sparsity | LPIPS | SSIM | CLIP. LPIPS and SSIM compare against the raw model's samples with the
same seeds. An "Original" row per model comes from a run at δ = 0 (sparsity 0, no LPIPS/SSIM).
When several runs share a (model, δ), the most recent file is shown.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Sequence

from fastattn.utils.cli import ArgumentParser
from fastattn.utils.io import atomic_write_bytes

from .tables import MISSING, RunRecord, as_number, config_model_field, format_number, load_records

V2_MODELS = {"sd3_medium_1024": ("SD3-medium", 0), "flux_dev_1024": ("FLUX.1-dev", 1),
             "flux_dev_2048": ("FLUX.1-dev", 2)}  # paper name, row order
HEADER = ["Model", "Resolution", "Threshold δ", "Attention Sparsity", "LPIPS↓", "SSIM↑", "CLIP↑"]


def is_v2_run(record: RunRecord) -> bool:
    m = record.metrics
    return m.get("kind", "run") == "run" and m.get("technique") == "headwise"


def table_rows(records: Sequence[RunRecord]) -> list[list[str]]:
    latest: dict[tuple[str, float], RunRecord] = {}
    for r in records:
        if not is_v2_run(r) or as_number(r.metrics.get("threshold")) is None:
            continue
        key = (r.metrics["model"], float(r.metrics["threshold"]))
        if key not in latest or r.recency > latest[key].recency:
            latest[key] = r
    rows = []
    for (model, delta), r in sorted(latest.items(), key=lambda kv: (V2_MODELS.get(kv[0][0], (kv[0][0], 99))[1],
                                                                       kv[0][0], kv[0][1])):
        m = r.metrics
        name = V2_MODELS.get(model, (model,))[0]
        side = as_number(config_model_field(r, "resolution"))
        original = delta == 0
        rows.append([
            name, MISSING if side is None else f"{side:g}",
            "Original" if original else f"δ={delta:g}",
            "0" if original else format_number(m.get("attn_sparsity"), 2),
            MISSING if original else format_number(m.get("lpips"), 3),
            MISSING if original else format_number(m.get("ssim"), 3),
            format_number(m.get("clip_score"), 4),
        ])
    return rows


def to_markdown(rows: list[list[str]]) -> str:
    if not rows:
        return "DiTFastAttnV2 table: no data; needs metrics.json of runs with search=headwise\n"
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
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
    rows = table_rows(load_records(args.runs_dir))
    out = args.out or args.runs_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    atomic_write_bytes(out / "table_v2.md", markdown.encode())
    atomic_write_bytes(out / "table_v2.csv", to_csv(rows).encode())
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
