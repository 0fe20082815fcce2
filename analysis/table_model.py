"""The one table model of the harness: run records read from run directories (or W&B), the
``Table`` every table is built as, cell formatting, the Markdown / LaTeX / CSV writers and the
command line every table module runs (``analysis.tables``: DiTFastAttn's Tables 1-6;
``analysis.tables_v2``: DiTFastAttnV2's tables).

A table module defines only its tables: a function from run records to ``Table`` objects.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastattn.utils.cli import ArgumentParser
from fastattn.utils.io import atomic_write_bytes

MISSING = "–"


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """One metrics.json; ``mtime`` then ``order`` decide which of several runs is the most recent."""

    metrics: Mapping[str, Any]
    source: str = "<memory>"
    mtime: float = 0.0
    order: int = 0

    @property
    def recency(self) -> tuple[float, int]:
        return (self.mtime, self.order)


def as_number(value: Any) -> float | None:
    """A finite int/float, else None (null, NaN, strings and booleans are not measurements)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def text_field(metrics: Mapping[str, Any], key: str, default: str) -> str:
    value = metrics.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else default


def config_field(record: RunRecord, group: str, key: str, default: Any = None) -> Any:
    """A field of a config group the harness stores under ``config.<group>``, if any."""
    config = record.metrics.get("config")
    section = config.get(group) if isinstance(config, Mapping) else None
    return section.get(key, default) if isinstance(section, Mapping) else default


def config_model_field(record: RunRecord, key: str) -> Any:
    """A field of the model config (``config.model``), if any."""
    return config_field(record, "model", key)


def as_run_record(item: RunRecord | Mapping[str, Any], position: int) -> RunRecord:
    """Plain dicts are accepted too; later items count as more recent when times tie."""
    if isinstance(item, RunRecord):
        return item
    return RunRecord(metrics=item, source=f"<record {position}>", order=position)


def read_record(path: Path, runs_dir: Path, order: int) -> RunRecord:
    """One metrics.json; raises ValueError with a short reason if it cannot be used."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable ({err})") from None
    if not isinstance(metrics, dict):
        raise ValueError("not a JSON object")
    if not text_field(metrics, "model", ""):
        raise ValueError("no 'model' key")
    return RunRecord(metrics, path.relative_to(runs_dir).as_posix(), path.stat().st_mtime, order)


def load_records(runs_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[RunRecord]:
    """Every usable metrics.json under runs_dir; unusable ones are reported through ``warn`` and skipped."""
    runs_dir = Path(runs_dir)
    warn = warn or (lambda message: print(message, file=sys.stderr))
    records = []
    for order, path in enumerate(sorted(runs_dir.rglob("metrics.json"))):
        try:
            records.append(read_record(path, runs_dir, order))
        except ValueError as reason:
            warn(f"warning: skipping {path}: {reason}")
    return records


def load_wandb_records(project: str, api=None) -> list[RunRecord]:
    """Runs of a W&B project ("entity/project"): the harness logs each run's metrics.json fields
    (numbers and the identifying strings) to the run summary."""
    if api is None:
        import wandb

        api = wandb.Api()
    records = []
    for order, wandb_run in enumerate(api.runs(project)):
        summary = {k: v for k, v in dict(wandb_run.summary).items() if not k.startswith("_")}
        if "model" in summary:
            records.append(RunRecord(summary, source=f"wandb:{project}/{wandb_run.id}", order=order))
    return records


# ----------------------------------------------------------------------------- cell selection


@dataclass(frozen=True)
class Pick:
    """The run shown in one table cell and how many runs competed for it."""

    run: RunRecord
    count: int


SKIP = object()  # a key function's "not in this table" (None is a key like any other)


def latest_per_key(runs: Iterable[RunRecord], key: Callable[[RunRecord], Any]) -> dict[Any, Pick]:
    """The most recent run for each key; runs whose key is :data:`SKIP` are left out."""
    grouped: dict[Any, list[RunRecord]] = {}
    for run in runs:
        if (k := key(run)) is not SKIP:
            grouped.setdefault(k, []).append(run)
    return {k: Pick(max(group, key=lambda r: r.recency), len(group)) for k, group in grouped.items()}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class HeaderCell:
    text: str
    span: int = 1


@dataclass
class Table:
    """A rendered-format-neutral table: header rows (with spans), body rows of strings, notes.

    ``label_columns`` leading columns hold labels (left-aligned), the rest numbers;
    ``section_starts`` are body-row indices that begin a new block (a rule in LaTeX).
    An empty table has no rows and ``empty_message`` says which runs it needs.
    ``compact``: the V2 paper's layout, a bare pipe table (no title, no padding) whose CSV keeps
    its header row when empty.
    """

    name: str
    number: str
    caption: str
    header: list[list[HeaderCell]]
    rows: list[list[str]] = field(default_factory=list)
    label_columns: int = 1
    section_starts: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    empty_message: str = ""
    compact: bool = False

    @property
    def title(self) -> str:
        return f"Table {self.number}: {self.caption}"

    @property
    def is_empty(self) -> bool:
        return not self.rows

    @property
    def width(self) -> int:
        return sum(cell.span for cell in self.header[0])

    def header_grid(self) -> list[list[str]]:
        """Header rows expanded to full width; a spanned cell's continuation is ""."""
        return [[text for cell in row for text in [cell.text] + [""] * (cell.span - 1)] for row in self.header]

    def grid(self) -> list[list[str]]:
        return self.header_grid() + [list(row) for row in self.rows]


def plain_header(*texts: str) -> list[HeaderCell]:
    return [HeaderCell(text) for text in texts]


def format_number(value: Any, digits: int = 2) -> str:
    number = as_number(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def format_percent(fraction: Any) -> str:
    number = as_number(fraction)
    return MISSING if number is None else f"{number * 100:.0f}%"


# ----------------------------------------------------------------------------- writers


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """Title, a pipe table (first header row as the Markdown header, the rest as leading rows), notes;
    a compact table is the pipe table alone, unpadded."""
    if table.is_empty:
        return table.empty_message + "\n"
    grid = [[markdown_cell(c) for c in row] for row in table.grid()]
    widths = [0 if table.compact else max(3, *(len(row[i]) for row in grid)) for i in range(table.width)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < table.label_columns else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    if table.compact:
        return "\n".join([line(grid[0]), "|" + "---|" * table.width] + [line(row) for row in grid[1:]]) + "\n"
    rule = ["-" * w if i < table.label_columns else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = [table.title, "", line(grid[0]), line(rule)] + [line(row) for row in grid[1:]]
    if table.notes:
        lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 MISSING: "--", "δ": r"$\delta$"}


def latex_text(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def latex_header_row(row: Sequence[HeaderCell], start_column: int) -> tuple[str, list[str]]:
    """A header line with \\multicolumn for spans, and the \\cmidrule lines under the spans."""
    cells, rules, column = [], [], start_column
    for cell in row:
        if cell.span > 1:
            cells.append(rf"\multicolumn{{{cell.span}}}{{c}}{{{latex_text(cell.text)}}}")
            rules.append(rf"\cmidrule(lr){{{column}-{column + cell.span - 1}}}")
        else:
            cells.append(latex_text(cell.text))
        column += cell.span
    return " & ".join(cells) + r" \\", rules


def to_latex(table: Table) -> str:
    """A booktabs tabular inside a table float; notes follow the tabular in small type."""
    if table.is_empty:
        return f"% {table.empty_message}\n"
    spec = "l" * table.label_columns + "r" * (table.width - table.label_columns)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             rf"\caption{{{latex_text(table.caption)}}}", rf"\label{{tab:{table.name}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    for row in table.header:
        header_line, rules = latex_header_row(row, start_column=1)
        lines.append(header_line + (" " + " ".join(rules) if rules else ""))
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        if i in table.section_starts and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_text(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines += [r"\par\smallskip\footnotesize"] + [latex_text(note) + r"\par" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The grid only (header rows then body rows); an empty table is its one-line message
    (a compact one its header row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([[table.empty_message]] if table.is_empty and not table.compact else table.grid())
    return buffer.getvalue()


RENDERERS: dict[str, Callable[[Table], str]] = {".md": to_markdown, ".tex": to_latex, ".csv": to_csv}


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_tables(tables: Mapping[str, Table], out_dir: str | os.PathLike,
                 suffixes: Sequence[str] = tuple(RENDERERS)) -> list[Path]:
    """``<name><suffix>`` for every table and suffix (of :data:`RENDERERS`) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        for suffix in suffixes:
            path = out_dir / f"{name}{suffix}"
            atomic_write_text(path, RENDERERS[suffix](table))
            written.append(path)
    return written


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None, prog: str, description: str, suffixes: Sequence[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", nargs="?",
                        help="folder searched recursively for metrics.json")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of a W&B project instead")
    files = "/".join(suffixes)
    parser.add_argument("--out", type=Path, metavar="OUT_DIR",
                        help=f"where the {files} files go (default RUNS_DIR/tables, or ./tables with --wandb)")
    return parser.parse_args(argv)


def table_main(argv: Sequence[str] | None, prog: str, doc: str,
               build: Callable[[list[RunRecord]], Mapping[str, Table]], suffixes: Sequence[str]) -> int:
    """A table module's command line: read the runs, print every table as Markdown, write its files."""
    args = parse_args(argv, prog, doc.split("\n\n")[0], suffixes)
    if args.wandb:
        records, where = load_wandb_records(args.wandb), f"W&B project {args.wandb}"
        out_dir = args.out or Path("tables")
    else:
        if args.runs_dir is None or not args.runs_dir.is_dir():
            print(f"error: runs directory not found: {args.runs_dir}", file=sys.stderr)
            return 2
        records, where = load_records(args.runs_dir), str(args.runs_dir)
        out_dir = args.out or args.runs_dir / "tables"
    tables = build(records)
    print("\n".join(to_markdown(table) for table in tables.values()), end="")
    written = write_tables(tables, out_dir, suffixes)
    print(f"read {len(records)} runs from {where}; wrote {len(written)} files to {out_dir}", file=sys.stderr)
    return 0
