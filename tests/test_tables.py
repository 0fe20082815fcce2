"""analysis.tables: the paper's Tables 1-5 from synthetic metrics.json folders."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.tables import (MISSING, build_tables, format_duration, load_records, row_of, to_csv, to_latex, to_markdown,
                             write_tables)

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000  # fixed mtimes, so "most recent" does not depend on write order

DIT, PIX_1K = "dit_xl_2_512", "pixart_sigma_xl_1024"


def run(model: str, name: str, delta: float, **metrics) -> dict:
    return dict(kind="run", model=model, solver="dpm_solver_50", threshold=delta, threshold_name=name,
                technique="all", **metrics)


def bench(model: str, seq_len: int, method: str, flops: float, latency: float) -> dict:
    return dict(kind="technique_benchmark", model=model, seq_len=seq_len, method=method,
                flops_fraction=flops, latency_fraction=latency)


# (relative folder, metrics, mtime offset); "dit/d2/a" sorts first but is the newer D2 run.
RUNS = [
    ("dit/raw", run(DIT, "raw", 0.0, attn_flops_fraction=1.0, fid=25.43, latency_s=6.66, attn_latency_s=2.26,
                    **{"is": 408.16}), 0),
    ("dit/d1", run(DIT, "d1", 0.025, attn_flops_fraction=0.85, fid=25.32, plan={"search_seconds": 250.0},
                   **{"is": 412.24}), 0),
    ("dit/d2/a", run(DIT, "d2", 0.05, attn_flops_fraction=0.69, fid=24.67, **{"is": 412.18}), 20),
    ("dit/d2/b", run(DIT, "d2", 0.05, attn_flops_fraction=0.70, fid=30.00, **{"is": 400.00}), 10),
    ("dit/d3", run(DIT, "d3", 0.075, attn_flops_fraction=0.59, fid=None), 0),
    ("dit/custom", run(DIT, "delta=0.07", 0.07, attn_flops_fraction=0.5, fid=20.1, **{"is": 380.5}), 0),
    ("dit/ablation", dict(run(DIT, "d4", 0.1, attn_flops_fraction=0.12, fid=99.99, **{"is": 111.11}),
                          technique="ast"), 0),
    ("pixart/d1", run(PIX_1K, "d1", 0.025, attn_flops_fraction=0.9, fid=55.73, clip_score=31.27, latency_s=12.55,
                      attn_latency_s=5.10, raw_latency_s=12.76, raw_attn_latency_s=5.30, **{"is": 24.27}), 0),
    ("iddpm/d1", dict(run(DIT, "d1", 0.025, fid=3.09, latency_s=31.53, attn_latency_s=10.21, raw_latency_s=32.62,
                          raw_attn_latency_s=11.40, **{"is": 218.2}), solver="iddpm_250"), 0),
    ("bench/asc", bench(DIT, 1024, "asc", 0.5, 0.59), 0),
    ("bench/wars", bench(DIT, 1024, "wars", 0.77, 0.85), 0),
    ("bench/ast_new", bench(DIT, 1024, "ast", 0.0, 0.04), 20),
    ("bench/ast_old", bench(DIT, 1024, "ast", 0.0, 0.05), 10),
    ("bench/pix", bench(PIX_1K, 4096, "wars+asc", 0.26, 0.31), 0),
]

TABLE1_MD = """\
Table 1: Image generation quality and attention FLOPs (fraction of the raw model) per threshold; DiTFastAttn, 50-step DPM-Solver.

| Model  | DiT-XL-2 512x512 |       |            | PixArt-Sigma-XL 1024x1024 |       |       |            |
| ------ | ---------------: | ----: | ---------: | ------------------------: | ----: | ----: | ---------: |
| Score  |               IS |   FID | Attn FLOPs |                        IS |   FID |  CLIP | Attn FLOPs |
| Raw    |           408.16 | 25.43 |       100% |                         – |     – |     – |          – |
| D1     |           412.24 | 25.32 |        85% |                     24.27 | 55.73 | 31.27 |        90% |
| D2     |           412.18 | 24.67 |        69% |                         – |     – |     – |          – |
| D3     |                – |     – |        59% |                         – |     – |     – |          – |
| D4     |                – |     – |          – |                         – |     – |     – |          – |
| D5     |                – |     – |          – |                         – |     – |     – |          – |
| D6     |                – |     – |          – |                         – |     – |     – |          – |
| δ=0.07 |           380.50 | 20.10 |        50% |                         – |     – |     – |          – |

- DiT-XL-2 512x512, D2: 2 runs; the most recent is shown (dit/d2/a/metrics.json).
"""


def write_run(root: Path, folder: str, metrics: dict | str, mtime: float = NOW) -> Path:
    path = root / folder / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for folder, metrics, offset in RUNS:
        write_run(root, folder, metrics, NOW + offset)
    return root


@pytest.fixture
def tables(runs_dir: Path) -> dict:
    return build_tables(load_records(runs_dir))


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.tables", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_table1_markdown_layout(tables):
    assert to_markdown(tables["table1"]) == TABLE1_MD


def test_rows_from_threshold_names_and_values():
    labels = [row_of(m) for m in ({"threshold_name": "d0"}, {"threshold_name": "raw"}, {"threshold": 0.0},
                                  {"threshold": 0.075}, {"threshold_name": "delta=0.07", "threshold": 0.07},
                                  {"threshold_name": "D2"}, {})]
    assert [label.text if label else None for label in labels] == ["Raw", "Raw", "Raw", "D3", "δ=0.07", "D2", None]
    assert [r.text for r in sorted(filter(None, labels))] == ["Raw", "Raw", "Raw", "D2", "D3", "δ=0.07"]


def test_table2_methods_and_latest_duplicate(tables):
    table = tables["table2"]
    assert table.header_grid() == [["Model", "Seqlen", "Metric", "ASC", "WA-RS", "WA-RS+ASC", "AST"]]
    assert table.rows == [
        ["DiT-XL-2 512x512", "1024", "Attn FLOPs", "50%", "77%", MISSING, "0%"],
        ["", "", "Attn Latency", "59%", "85%", MISSING, "4%"],  # ast_new (newer mtime) wins over ast_old
        ["PixArt-Sigma-XL 1024x1024", "4096", "Attn FLOPs", MISSING, MISSING, "26%", MISSING],
        ["", "", "Attn Latency", MISSING, MISSING, "31%", MISSING],
    ]
    assert table.notes == ["DiT-XL-2 512x512, seq_len 1024, AST: 2 runs; the most recent is shown "
                           "(bench/ast_new/metrics.json)."]


def test_latency_tables_and_raw_fallback(tables):
    dit = tables["table3"]
    assert dit.header_grid()[0] == ["Model", "Resolution", "Config", "Latency (s)", "Attn Latency (s)", "FID", "IS"]
    assert dit.rows[0] == ["DiT-XL-2", "512x512", "Raw", "6.66", "2.26", "25.43", "408.16"]
    assert dit.rows[2] == ["", "", "D2", MISSING, MISSING, "24.67", "412.18"]
    assert [r[2] for r in dit.rows] == ["Raw", "D1", "D2", "D3", "D4", "D5", "D6", "δ=0.07"]

    pixart = tables["table4"]
    assert pixart.header_grid()[0][-3:] == ["FID", "IS", "CLIP"]
    # Raw latency borrowed from the D1 run's raw timing; Raw quality stays missing (no raw run).
    assert pixart.rows[0] == ["PixArt-Sigma-XL 1024x1024", "Raw", "12.76", "5.30", MISSING, MISSING, MISSING]
    assert pixart.rows[1] == ["", "D1", "12.55", "5.10", "55.73", "24.27", "31.27"]
    assert any("no raw run" in note and "pixart/d1/metrics.json" in note for note in pixart.notes)

    iddpm = tables["table5"]
    assert [r[2] for r in iddpm.rows] == ["Raw", "D1", "D2", "D3", "D4"]
    assert iddpm.rows[0][3:] == ["32.62", "11.40", MISSING, MISSING]
    assert iddpm.rows[1][3:] == ["31.53", "10.21", "3.09", "218.20"]


def test_nothing_invented(runs_dir, tables):
    """Every value cell is the formatting of some number in the files; ablation values never appear."""
    shown = {f"{v:.2f}" for _, m, _ in RUNS for v in m.values() if isinstance(v, float)}
    shown |= {f"{v * 100:.0f}%" for _, m, _ in RUNS for v in m.values() if isinstance(v, float)}
    shown |= {str(m["seq_len"]) for _, m, _ in RUNS if "seq_len" in m}
    seconds = [m["plan"]["search_seconds"] for _, m, _ in RUNS if "plan" in m]
    shown |= {format_duration(s) for s in seconds} | {f"{s / 6.66:.2f}" for s in seconds}  # over the raw latency
    for table in tables.values():
        for row in table.rows:
            for cell in row[table.label_columns:]:
                assert cell == MISSING or cell in shown, (table.name, row)
    all_cells = {cell for table in tables.values() for row in table.rows for cell in row}
    assert not {"99.99", "111.11", "12%", "30.00", "400.00"} & all_cells  # ablation and the older D2 run


def test_csv_round_trip(tables, tmp_path):
    write_tables(tables, tmp_path)
    for name, table in tables.items():
        with open(tmp_path / f"{name}.csv", newline="", encoding="utf-8") as handle:
            assert list(csv.reader(handle)) == table.grid()


def test_latex_columns(tables):
    for table in tables.values():
        tex = to_latex(table).splitlines()
        spec = next(line for line in tex if line.startswith(r"\begin{tabular}"))
        assert len(spec.removeprefix(r"\begin{tabular}{").removesuffix("}")) == table.width
        body = tex[tex.index(r"\midrule") + 1: tex.index(r"\bottomrule")]
        data_lines = [line for line in body if line != r"\midrule"]
        assert len(data_lines) == len(table.rows)
        assert all(line.count("&") - line.count(r"\&") == table.width - 1 for line in data_lines)
        assert all(line.endswith(r"\\") for line in data_lines)
    first_header = to_latex(tables["table1"]).splitlines()[7]
    assert first_header.startswith(r"Model & \multicolumn{3}{c}{DiT-XL-2 512x512} & \multicolumn{4}{c}")
    assert r"100\%" in to_latex(tables["table1"]) and "$\\delta$=0.07" in to_latex(tables["table1"])


def test_empty_tables_say_what_they_need(tmp_path):
    tables = build_tables([run(DIT, "d2", 0.05, attn_flops_fraction=0.7)])
    assert tables["table1"].rows and tables["table3"].rows  # the one run fills these
    for name in ("table2", "table4", "table5"):
        assert tables[name].is_empty
        for text in (to_markdown(tables[name]), to_latex(tables[name]), to_csv(tables[name])):
            assert len(text.splitlines()) == 1 and "needs" in text
    assert "iddpm_250" in to_markdown(tables["table5"])


def test_corrupt_metrics_json_warns_and_is_skipped(runs_dir):
    bad = write_run(runs_dir, "broken", "{not json")
    warnings: list[str] = []
    records = load_records(runs_dir, warn=warnings.append)
    assert len(records) == len(RUNS)
    assert len(warnings) == 1 and str(bad) in warnings[0] and "invalid JSON" in warnings[0]
    assert "\n" not in warnings[0]


def test_cli_end_to_end(runs_dir, tmp_path):
    write_run(runs_dir, "broken", "{not json")
    out = tmp_path / "out"
    result = cli(runs_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and str(runs_dir / "broken" / "metrics.json") in warnings[0]
    names = [f"table{i}" for i in range(1, 7)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{s}" for n in names for s in (".csv", ".md", ".tex"))
    assert (out / "table1.md").read_text(encoding="utf-8") == TABLE1_MD
    tables = build_tables(load_records(runs_dir, warn=lambda _: None))
    assert result.stdout == "\n".join(to_markdown(tables[name]) for name in names)


def test_cli_missing_runs_dir(tmp_path):
    missing = tmp_path / "nowhere"
    result = cli(missing, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: runs directory not found: {missing}"]
    assert not (tmp_path / "out").exists()


def test_tables_from_a_wandb_project(tmp_path):
    from types import SimpleNamespace

    from analysis.tables import load_wandb_records

    class FakeApi:
        def runs(self, project):
            assert project == "me/fastattn"
            return [SimpleNamespace(id="a1", summary={"model": "dit_xl_2_512", "threshold_name": "d2",
                                                      "technique": "all", "attn_flops_fraction": 0.69, "_step": 0}),
                    SimpleNamespace(id="b2", summary={"_step": 0})]  # not a fastattn run

    records = load_wandb_records("me/fastattn", api=FakeApi())
    assert len(records) == 1 and records[0].source == "wandb:me/fastattn/a1"
    table1 = to_markdown(build_tables(records)["table1"])
    assert "69%" in next(line for line in table1.splitlines() if line.startswith("| D2"))


def test_table6_plan_search_time_in_the_papers_layout():
    searched = [
        run(DIT, "raw", 0.0, latency_s=10.0, plan={"source": "search", "search_seconds": 279.0}),
        run(DIT, "d2", 0.05, plan={"source": "search", "search_seconds": 248.4, "search_raw_generations": 14.6}),
        run(DIT, "d6", 0.15, plan={"source": "search", "search_seconds": 194.0}),
        run(PIX_1K, "d4", 0.1, raw_latency_s=20.0, plan={"source": "search", "search_seconds": 6613.0}),
        run(PIX_1K, "d2", 0.05, plan={"source": "file", "search_seconds": None}),  # a given plan: no search time
    ]
    table = build_tables(searched)["table6"]
    assert [c.text for c in table.header[0]] == ["Model", "Resolution", "Config", "greedy"]  # runs before the field
    assert table.rows == [
        ["DiT-XL-2", "512x512", "Raw", "04m39s", "27.90", MISSING],
        ["", "", "D2", "04m08s", "24.84", "14.60"],
        ["", "", "D4", MISSING, MISSING, MISSING],
        ["", "", "D6", "03m14s", "19.40", MISSING],
        ["PixArt-Sigma-XL", "1024x1024", "Raw", MISSING, MISSING, MISSING],
        ["", "", "D2", MISSING, MISSING, MISSING],
        ["", "", "D4", "1h50m13s", "330.65", MISSING],
        ["", "", "D6", MISSING, MISSING, MISSING],
    ]
    assert build_tables([])["table6"].is_empty


def test_table6_has_a_column_group_per_search_algorithm():
    def searched(row, delta, algorithm, seconds, generations):
        return run(DIT, row, delta, latency_s=10.0, plan={"source": "search", "search_algorithm": algorithm,
                                                          "search_seconds": seconds,
                                                          "search_raw_generations": generations})

    table = build_tables([searched("d2", 0.05, "greedy", 120.0, 14.6), searched("d2", 0.05, "fast", 20.0, 2.5),
                          searched("d4", 0.1, "fast", 18.0, 2.4)])["table6"]
    assert [(c.text, c.span) for c in table.header[0][3:]] == [("fast", 3), ("greedy", 3)]
    assert [c.text for c in table.header[1][3:6]] == ["Plan Search Time", "Generations", "Raw Generations (counted)"]
    rows = {row[2]: row[3:] for row in table.rows}
    assert rows["D2"] == ["00m20s", MISSING, "2.50", "02m00s", MISSING, "14.60"]  # no raw run timed: no Generations
    assert rows["D4"] == ["00m18s", MISSING, "2.40", MISSING, MISSING, MISSING]
