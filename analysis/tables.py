"""The paper's result tables (DiTFastAttn Tables 1-5) from the harness's ``metrics.json`` files.

    python -m analysis.tables RUNS_DIR [--out OUT_DIR]

reads every ``metrics.json`` under RUNS_DIR (recursively), prints each table as Markdown and
writes ``tableN.md``, ``tableN.tex`` and ``tableN.csv`` for N = 1..6 into OUT_DIR (default
``RUNS_DIR/tables``):

- table1: IS / FID / CLIP / attention-FLOPs percentage per threshold, one column group per model
  (``kind=run``, ``technique=all``, ``solver=dpm_solver_50``).
- table2: FLOPs and latency fraction of ASC, WA-RS, WA-RS+ASC and AST, two rows per
  (model, sequence length) (``kind=technique_benchmark``).
- table3 / table4: latency, attention latency, FID, IS (and CLIP) per threshold with 50-step
  DPM-Solver; the paper splits them by model kind, so table3 holds class-conditional models
  (DiT) and table4 text-to-image models (PixArt, or any model that reports a CLIP score).
- table5: as table3 for ``solver=iddpm_250`` (the DiT paper's setting).
- table6: plan search time per model and threshold (the paper's Raw, D2, D4, D6 rows and any
  other with a run), a column group per search algorithm: the seconds each run's plan recorded
  when it was searched, the same in generations of the raw model where the run timed one, and the
  work the search counted in raw generations (``plan.search_raw_generations``).

Cells come only from the files read: a missing or null metric prints as "–". Raw rows come from
raw/d0 runs; without one, the Raw latencies (only those) are taken from the raw-model timings a
compressed run of the same model and solver recorded, and a note says so. When several runs land
in one cell, the most recent file (modification time) is shown and a note gives the count.
Missing keys default to the harness's defaults: kind=run, solver=dpm_solver_50, technique=all;
a run without ``threshold_name`` is placed by its ``threshold`` (0 -> Raw, 0.025*k -> Dk).

The CSV files hold the table grid only (header rows, then body rows, "" for a spanned or
continued cell); notes are in the Markdown and LaTeX files. The LaTeX uses booktabs.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .table_model import (
    MISSING,
    SKIP,
    HeaderCell,
    Pick,
    RunRecord,
    Table,
    as_number,
    as_run_record,
    config_model_field,
    format_number,
    format_percent,
    latest_per_key,
    load_records,
    load_wandb_records,
    plain_header,
    table_main,
    text_field,
    to_csv,
    to_latex,
    to_markdown,
    write_tables,
)

# The model's names tests and notebooks import from here.
__all__ = ["MISSING", "RunRecord", "Table", "build_tables", "format_duration", "load_records",
           "load_wandb_records", "main", "row_of", "to_csv", "to_latex", "to_markdown", "write_tables"]

DEFAULT_KIND, DEFAULT_SOLVER, DEFAULT_TECHNIQUE = "run", "dpm_solver_50", "all"
MAIN_SOLVER, IDDPM_SOLVER = "dpm_solver_50", "iddpm_250"
THRESHOLD_STEP = 0.025  # D_k is delta = 0.025 k (paper section 4.1)

# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    name: str
    resolution: str
    text_to_image: bool

    @property
    def label(self) -> str:
        return f"{self.name} {self.resolution}"


PAPER_MODELS: dict[str, ModelInfo] = {  # insertion order is the paper's column / section order
    "dit_xl_2_512": ModelInfo("DiT-XL-2", "512x512", text_to_image=False),
    "pixart_sigma_xl_1024": ModelInfo("PixArt-Sigma-XL", "1024x1024", text_to_image=True),
    "pixart_sigma_xl_2k": ModelInfo("PixArt-Sigma-XL", "2048x2048", text_to_image=True),
}

METHOD_LABELS = {"asc": "ASC", "wars": "WA-RS", "wars+asc": "WA-RS+ASC", "ast": "AST"}


def model_order(model: str) -> tuple[int, str]:
    paper = list(PAPER_MODELS)
    return (paper.index(model), "") if model in paper else (len(paper), model)



# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True, order=True)
class RowLabel:
    sort_key: tuple
    text: str = field(compare=False)


RAW_ROW = RowLabel((0,), "Raw")


def d_row(k: int) -> RowLabel:
    return RowLabel((1, k), f"D{k}")


def custom_row(delta: float) -> RowLabel:
    return RowLabel((2, delta), f"δ={delta:g}")


def row_from_delta(delta: float) -> RowLabel:
    if delta == 0:
        return RAW_ROW
    k = round(delta / THRESHOLD_STEP)
    if 1 <= k <= 6 and math.isclose(delta, k * THRESHOLD_STEP, abs_tol=1e-9):
        return d_row(k)
    return custom_row(delta)


def row_of(metrics: Mapping[str, Any]) -> RowLabel | None:
    """Table row of a run: its threshold_name (raw, d0..dk, delta=x) or else its threshold."""
    delta = as_number(metrics.get("threshold"))
    name = text_field(metrics, "threshold_name", "").lower()
    if not name:
        return row_from_delta(delta) if delta is not None else None
    if name in ("raw", "d0"):
        return RAW_ROW
    if match := re.fullmatch(r"d(\d+)", name):
        return d_row(int(match.group(1)))
    if match := re.fullmatch(r"(?:delta|δ)\s*=\s*([0-9.eE+-]+)", name):
        try:
            return custom_row(float(match.group(1)))
        except ValueError:
            pass
    if delta is not None:
        return custom_row(delta)
    return RowLabel((3, name), name)  # an unparseable label still gets its own row, last


def standard_rows(last_d: int) -> list[RowLabel]:
    return [RAW_ROW] + [d_row(k) for k in range(1, last_d + 1)]


def ordered_rows(present: Iterable[RowLabel], last_d: int) -> list[RowLabel]:
    """The paper's rows (Raw, D1..D<last_d>) and any others that have runs, in threshold order."""
    return sorted(set(standard_rows(last_d)) | set(present))


def model_of(record: RunRecord) -> str:
    return text_field(record.metrics, "model", "?")


def is_table_run(record: RunRecord, solver: str) -> bool:
    """A main-job run with every technique, as Tables 1, 3, 4 and 5 need."""
    m = record.metrics
    return (text_field(m, "kind", DEFAULT_KIND) == "run"
            and text_field(m, "technique", DEFAULT_TECHNIQUE) == "all"
            and text_field(m, "solver", DEFAULT_SOLVER) == solver)


def is_text_to_image(model: str, records: Sequence[RunRecord]) -> bool:
    """Known for the paper's models; for others, a PixArt name or family, or any reported CLIP score."""
    if model in PAPER_MODELS:
        return PAPER_MODELS[model].text_to_image
    own = [r for r in records if model_of(r) == model]
    return "pixart" in model.lower() or any(
        config_model_field(r, "family") == "pixart" or as_number(r.metrics.get("clip_score")) is not None
        for r in own)


def model_label(model: str) -> str:
    return PAPER_MODELS[model].label if model in PAPER_MODELS else model


def model_name_and_resolution(model: str, runs: Sequence[RunRecord]) -> tuple[str, str]:
    """Paper name and resolution; an unknown model is named by its key, resolution from its config."""
    if model in PAPER_MODELS:
        info = PAPER_MODELS[model]
        return info.name, info.resolution
    sides = (as_number(config_model_field(run, "resolution")) for run in runs)
    side = next((s for s in sides if s is not None), None)
    return (model, MISSING) if side is None else (model, f"{side:g}x{side:g}")


# ----------------------------------------------------------------------------- cell selection


def duplicate_note(where: str, pick: Pick) -> str:
    return f"{where}: {pick.count} runs; the most recent is shown ({pick.run.source})."


def runs_by_model_and_row(records: Sequence[RunRecord], solver: str) -> dict[str, dict[RowLabel, Pick]]:
    picks = latest_per_key((r for r in records if is_table_run(r, solver)),
                           lambda r: (model_of(r), row) if (row := row_of(r.metrics)) else SKIP)
    by_model: dict[str, dict[RowLabel, Pick]] = {}
    for (model, row), pick in picks.items():
        by_model.setdefault(model, {})[row] = pick
    return dict(sorted(by_model.items(), key=lambda item: model_order(item[0])))


def unplaced_note(records: Sequence[RunRecord], solver: str) -> list[str]:
    unplaced = [r.source for r in records if is_table_run(r, solver) and row_of(r.metrics) is None]
    return [f"{len(unplaced)} run(s) without threshold or threshold_name left out: {', '.join(unplaced)}."
            ] if unplaced else []


# ----------------------------------------------------------------------------- Table 1


def table1_group(model: str, records: Sequence[RunRecord]) -> list[tuple[str, Callable[[Mapping], str]]]:
    """(column name, cell formatter) for one model's column group, in the paper's order."""
    columns = [("IS", lambda m: format_number(m.get("is"))), ("FID", lambda m: format_number(m.get("fid")))]
    if is_text_to_image(model, records):
        columns.append(("CLIP", lambda m: format_number(m.get("clip_score"))))
    columns.append(("Attn FLOPs", lambda m: format_percent(m.get("attn_flops_fraction"))))
    return columns


def build_table1(records: Sequence[RunRecord]) -> Table:
    table = Table("table1", "1", "Image generation quality and attention FLOPs (fraction of the raw model) "
                  "per threshold; DiTFastAttn, 50-step DPM-Solver.",
                  header=[[HeaderCell("Model")], [HeaderCell("Score")]],
                  empty_message="Table 1: no data; needs metrics.json with kind=run, technique=all, "
                                "solver=dpm_solver_50 and threshold_name raw, d1..d6 "
                                "(is, fid, clip_score, attn_flops_fraction).")
    by_model = runs_by_model_and_row(records, MAIN_SOLVER)
    if not by_model:
        return table
    groups = {model: table1_group(model, records) for model in by_model}
    for model, columns in groups.items():
        table.header[0].append(HeaderCell(model_label(model), span=len(columns)))
        table.header[1].extend(HeaderCell(name) for name, _ in columns)
    present = (row for picks in by_model.values() for row in picks)
    for row in ordered_rows(present, last_d=6):
        cells = [row.text]
        for model, columns in groups.items():
            pick = by_model[model].get(row)
            cells += [fmt(pick.run.metrics) if pick else MISSING for _, fmt in columns]
            if pick and pick.count > 1:
                table.notes.append(duplicate_note(f"{model_label(model)}, {row.text}", pick))
        table.rows.append(cells)
    table.notes += unplaced_note(records, MAIN_SOLVER)
    return table


# ----------------------------------------------------------------------------- Table 2


def method_columns(methods: Iterable[str]) -> list[str]:
    """The paper's four methods, then any other benchmarked method by its key."""
    return list(METHOD_LABELS) + sorted(set(methods) - set(METHOD_LABELS))


def build_table2(records: Sequence[RunRecord]) -> Table:
    benchmarks = [r for r in records if text_field(r.metrics, "kind", DEFAULT_KIND) == "technique_benchmark"]
    placed = [r for r in benchmarks if text_field(r.metrics, "method", "")]
    unplaced = [r.source for r in benchmarks if not text_field(r.metrics, "method", "")]
    methods = method_columns(text_field(r.metrics, "method", "").lower() for r in placed)
    table = Table("table2", "2", "Attention FLOPs fraction and latency fraction of each technique "
                  "relative to raw attention.",
                  header=[plain_header("Model", "Seqlen", "Metric", *(METHOD_LABELS.get(m, m) for m in methods))],
                  label_columns=3,
                  empty_message="Table 2: no data; needs metrics.json with kind=technique_benchmark, model, "
                                "seq_len, method (asc, wars, wars+asc, ast), flops_fraction, latency_fraction.")
    picks = latest_per_key(placed, lambda r: (model_of(r), as_number(r.metrics.get("seq_len")),
                                              text_field(r.metrics, "method", "").lower()))
    blocks = sorted({(model, seq_len) for model, seq_len, _ in picks},
                    key=lambda b: (model_order(b[0]), b[1] is None, b[1] or 0))
    for model, seq_len in blocks:
        table.section_starts.append(len(table.rows))
        for i, (metric, key) in enumerate([("Attn FLOPs", "flops_fraction"), ("Attn Latency", "latency_fraction")]):
            lead = [model_label(model), format_number(seq_len, 0)] if i == 0 else ["", ""]
            cells = [format_percent(picks[(model, seq_len, m)].run.metrics.get(key))
                     if (model, seq_len, m) in picks else MISSING for m in methods]
            table.rows.append(lead + [metric] + cells)
    for (model, seq_len, method), pick in picks.items():
        if pick.count > 1:
            where = f"{model_label(model)}, seq_len {format_number(seq_len, 0)}, {METHOD_LABELS.get(method, method)}"
            table.notes.append(duplicate_note(where, pick))
    if unplaced:
        table.notes.append(f"{len(unplaced)} benchmark record(s) without method left out: {', '.join(unplaced)}.")
    return table


# ----------------------------------------------------------------------------- Tables 3, 4, 5


@dataclass(frozen=True)
class LatencyLayout:
    """What differs between Tables 3, 4 and 5: which runs, which columns, how the model is named."""

    name: str
    number: str
    caption: str
    solver: str
    text_to_image: bool
    last_d: int
    empty_message: str

    @property
    def split_resolution(self) -> bool:  # Tables 3 and 5 give the resolution its own column
        return not self.text_to_image

    def header(self) -> list[HeaderCell]:
        lead = ("Model", "Resolution", "Config") if self.split_resolution else ("Model", "Config")
        quality = ("FID", "IS", "CLIP") if self.text_to_image else ("FID", "IS")
        return plain_header(*lead, "Latency (s)", "Attn Latency (s)", *quality)


LATENCY_LAYOUTS = [
    LatencyLayout("table3", "3", "Latency (s per sample), self-attention latency, FID and IS with 50-step "
                  "DPM-Solver; class-conditional models.", MAIN_SOLVER, False, 6,
                  "Table 3: no data; needs metrics.json with kind=run, technique=all, solver=dpm_solver_50 of a "
                  "class-conditional model (e.g. dit_xl_2_512), threshold_name raw, d1..d6."),
    LatencyLayout("table4", "4", "Latency (s per sample), self-attention latency, FID, IS and CLIP with 50-step "
                  "DPM-Solver; text-to-image models.", MAIN_SOLVER, True, 6,
                  "Table 4: no data; needs metrics.json with kind=run, technique=all, solver=dpm_solver_50 of a "
                  "text-to-image model (e.g. pixart_sigma_xl_1024, pixart_sigma_xl_2k), threshold_name raw, d1..d6."),
    LatencyLayout("table5", "5", "Latency (s per sample), self-attention latency, FID and IS in the DiT paper's "
                  "setting (250-step IDDPM, CFG 1.5).", IDDPM_SOLVER, False, 4,
                  "Table 5: no data; needs metrics.json with kind=run, technique=all, solver=iddpm_250 "
                  "(e.g. dit_xl_2_512 with guidance 1.5), threshold_name raw, d1..d4."),
]


def first_number(metrics: Mapping[str, Any], *keys: str) -> float | None:
    return next((v for k in keys if (v := as_number(metrics.get(k))) is not None), None)


def raw_latencies(picks: Mapping[RowLabel, Pick], label: str) -> tuple[float | None, float | None, list[str]]:
    """Raw (latency, attention latency) from the raw run, else from a compressed run's raw timing."""
    if RAW_ROW in picks:
        m = picks[RAW_ROW].run.metrics
        return (first_number(m, "latency_s", "raw_latency_s"),
                first_number(m, "attn_latency_s", "raw_attn_latency_s"), [])
    timed = [p.run for p in picks.values()
             if first_number(p.run.metrics, "raw_latency_s", "raw_attn_latency_s") is not None]
    if not timed:
        return None, None, []
    source = max(timed, key=lambda r: r.recency)
    note = (f"{label}, Raw: no raw run; the latencies are the raw-model timings recorded by the "
            f"{row_of(source.metrics).text} run ({source.source}).")
    return (as_number(source.metrics.get("raw_latency_s")),
            as_number(source.metrics.get("raw_attn_latency_s")), [note])


def latency_row(row: RowLabel, pick: Pick | None, raw_timing: tuple[float | None, float | None],
                text_to_image: bool) -> list[str]:
    """Config, latency, attention latency and quality cells of one row."""
    metrics = pick.run.metrics if pick else {}
    if row == RAW_ROW:
        latency, attn_latency = raw_timing
    else:
        latency, attn_latency = as_number(metrics.get("latency_s")), as_number(metrics.get("attn_latency_s"))
    quality = ["fid", "is", "clip_score"] if text_to_image else ["fid", "is"]
    return [row.text, format_number(latency), format_number(attn_latency)] + [
        format_number(metrics.get(key)) for key in quality]


def build_latency_table(records: Sequence[RunRecord], layout: LatencyLayout) -> Table:
    table = Table(layout.name, layout.number, layout.caption, header=[layout.header()],
                  label_columns=3 if layout.split_resolution else 2, empty_message=layout.empty_message)
    for model, picks in runs_by_model_and_row(records, layout.solver).items():
        if is_text_to_image(model, records) != layout.text_to_image:
            continue
        name, resolution = model_name_and_resolution(model, [p.run for p in picks.values()])
        lead = [name, resolution] if layout.split_resolution else [model_label(model)]
        latency, attn_latency, notes = raw_latencies(picks, model_label(model))
        table.notes += notes
        table.section_starts.append(len(table.rows))
        for i, row in enumerate(ordered_rows(picks, layout.last_d)):
            pick = picks.get(row)
            lead_cells = lead if i == 0 else [""] * len(lead)
            table.rows.append(lead_cells + latency_row(row, pick, (latency, attn_latency), layout.text_to_image))
            if pick and pick.count > 1:
                table.notes.append(duplicate_note(f"{model_label(model)}, {row.text}", pick))
    if not table.is_empty:
        table.notes += unplaced_note(records, layout.solver)
    return table


# ----------------------------------------------------------------------------- Table 6

TABLE6_ROWS = [RAW_ROW, d_row(2), d_row(4), d_row(6)]


def format_duration(seconds: Any) -> str:
    """The paper's ``04m39s`` / ``1h50m13s``."""
    seconds = as_number(seconds)
    if seconds is None:
        return MISSING
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes:02d}m{secs:02d}s"


def search_seconds(metrics: Mapping[str, Any]) -> float | None:
    return as_number((metrics.get("plan") or {}).get("search_seconds"))


def search_algorithm(metrics: Mapping[str, Any]) -> str:
    """The search that made a run's plan, as its plan records it; a run from before plans named it
    gives its config's search, and before that there was only Algorithm 1 (greedy)."""
    return text_field(metrics.get("plan") or {}, "search_algorithm", text_field(metrics, "search", "greedy"))


# A column group per search algorithm: wall time, the same over one raw generation's latency, and
# the work the search counted (batch rows through the transformer over one raw generation's).
TABLE6_COLUMNS = ("Plan Search Time", "Generations", "Raw Generations (counted)")


def table6_cells(metrics: Mapping[str, Any] | None, raw_latency: float | None) -> list[str]:
    if metrics is None:
        return [MISSING] * len(TABLE6_COLUMNS)
    seconds = search_seconds(metrics)
    per_generation = seconds / raw_latency if seconds is not None and raw_latency else None
    counted = (metrics.get("plan") or {}).get("search_raw_generations")
    return [format_duration(seconds), format_number(per_generation), format_number(counted)]


def build_table6(records: Sequence[RunRecord]) -> Table:
    table = Table("table6", "6", "Compression plan search time per model and threshold (50-step DPM-Solver), one "
                  "column group per search algorithm; Generations: the search time over one raw generation of the "
                  "same batch, where the run timed it; Raw Generations (counted): the batch rows the search passed "
                  "through the transformer over one raw generation's.",
                  header=[plain_header("Model", "Resolution", "Config"), plain_header("", "", "")], label_columns=3,
                  empty_message="Table 6: no data; needs metrics.json with kind=run, solver=dpm_solver_50 and "
                                "plan.search_seconds (runs that searched their plan).")
    searched = [r for r in records if search_seconds(r.metrics) is not None]
    by_algorithm = {a: runs_by_model_and_row([r for r in searched if search_algorithm(r.metrics) == a], MAIN_SOLVER)
                    for a in sorted({search_algorithm(r.metrics) for r in searched})}
    for algorithm in by_algorithm:
        table.header[0].append(HeaderCell(algorithm, span=len(TABLE6_COLUMNS)))
        table.header[1].extend(plain_header(*TABLE6_COLUMNS))
    for model, picks in runs_by_model_and_row(searched, MAIN_SOLVER).items():  # every algorithm's runs
        name, resolution = model_name_and_resolution(model, [p.run for p in picks.values()])
        raw_latency = raw_latencies(picks, model_label(model))[0]
        table.section_starts.append(len(table.rows))
        for i, row in enumerate(sorted(set(TABLE6_ROWS) | set(picks))):
            cells = [name, resolution] if i == 0 else ["", ""]
            cells.append(row.text)
            for algorithm, models in by_algorithm.items():
                pick = models.get(model, {}).get(row)
                cells += table6_cells(pick.run.metrics if pick else None, raw_latency)
                if pick and pick.count > 1:
                    table.notes.append(duplicate_note(f"{model_label(model)}, {row.text}, {algorithm}", pick))
            table.rows.append(cells)
    return table


def build_tables(records: Iterable[RunRecord | Mapping[str, Any]]) -> dict[str, Table]:
    """All six tables, keyed table1..table6, from RunRecords (or plain metrics dicts)."""
    runs = [as_run_record(item, i) for i, item in enumerate(records)]
    tables = {"table1": build_table1(runs), "table2": build_table2(runs)}
    tables.update((layout.name, build_latency_table(runs, layout)) for layout in LATENCY_LAYOUTS)
    tables["table6"] = build_table6(runs)
    return tables



def main(argv: Sequence[str] | None = None) -> int:
    return table_main(argv, "python -m analysis.tables", __doc__, build_tables, (".md", ".tex", ".csv"))


if __name__ == "__main__":
    sys.exit(main())
