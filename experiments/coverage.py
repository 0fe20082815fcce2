"""Coverage: which DiT transformer classes of the installed diffusers fastattn serves, each built tiny
with random weights and checked through the public API only; the table is printed and written as
Markdown, with its JSON beside it.

    python -m experiments.coverage                     # every class, into docs/results/coverage.md
    python -m experiments.coverage classes=[FluxTransformer2DModel] out=flux.md

Per class: an adapter describes it (the plan families it takes); an all-full plan of each family
sized from that description gives outputs bit-identical to the raw model over a short loop of
calls at different timesteps; removing fastattn restores weights, processors and outputs exactly;
on models whose layers are all self-attention a layer-wise WA-RS / AST plan runs. Each failure is
a one-line reason in the table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fastattn.utils.io import atomic_write_bytes, atomic_write_json

from .infra.app import ConfigError, hydra_app
from .infra.config import check_int, value_at
from .infra.coverage import CHECKS, check_class, dit_classes

HEADERS = ("class", "pipelines", "plan families", *CHECKS, "reason")


def check_config(cfg: DictConfig, listed: dict[str, list[str]]) -> None:
    check_int(cfg, "cpu_threads")
    unknown = [c for c in value_at(cfg, "classes") or [] if c not in listed]
    if unknown:
        raise ConfigError(f"classes: {', '.join(map(str, unknown))} not among the listed DiT classes "
                          f"({', '.join(listed)})")
    steps = list(value_at(cfg, "timesteps") or [])
    if len(steps) < 2 or len(set(steps)) != len(steps) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1000 for v in steps):
        raise ConfigError(f"timesteps must be two or more distinct numbers in [0, 1000], got {steps}")


def pipelines_cell(pipelines: list[str]) -> str:
    return ", ".join(pipelines[:3]) + (f" (+{len(pipelines) - 3})" if len(pipelines) > 3 else "")


def summary(rows: list[dict[str, Any]]) -> str:
    return f"{sum(r['passed'] for r in rows)} of {len(rows)} classes pass"


def markdown(rows: list[dict[str, Any]], seconds: float) -> str:
    import diffusers

    import fastattn

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"# fastattn coverage of diffusers {diffusers.__version__}'s DiT transformers", "",
             f"fastattn {fastattn.__version__}; written by `python -m experiments.coverage` "
             f"({len(rows)} classes, tiny random-weight models on the CPU, {seconds:.0f} s).", "",
             f"**{summary(rows)}.** A class passes when every check that applies passes; '-' is a check not run "
             "(an earlier one failed) or not applicable.", "",
             "Checks, through the public API: *built* (the tiny model runs raw), *adapter* (`fastattn.describe` names "
             "a plan family), *all_full* (each family's all-full plan `torch.equal` to raw over three calls: every "
             "keyword the model passes kept), *removal* (weights, processors and outputs restored), *techniques* "
             "(full, WA-RS, AST, and with a CFG batch WA-RS+ASC and ASC, run by fastattn on a float64 copy equal to "
             "the same plan spelled out from the definitions, `experiments/infra/definitions.py`; float32 where the "
             "model runs no float64), *search* (Algorithm 1 over a four-step loop, its plan applied).", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        values = (r["class"], pipelines_cell(r["pipelines"]), r["families"], *(r[c] for c in CHECKS), r["reason"])
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict[str, Any]], out: Path, seconds: float) -> None:
    width = max(len(r["class"]) for r in rows)
    print(f"\n{'class':<{width}}  {'families':<10} " + " ".join(f"{c:<9}" for c in CHECKS) + "reason")
    for r in rows:
        print(f"{r['class']:<{width}}  {r['families']:<10} " + " ".join(f"{r[c]:<9}" for c in CHECKS) + r["reason"])
    atomic_write_bytes(out, markdown(rows, seconds).encode())
    atomic_write_json(out.with_suffix(".json"), {"summary": summary(rows), "seconds": round(seconds, 1),
                                                 "rows": rows})
    print(f"\n{summary(rows)}  (table: {out}, {out.with_suffix('.json').name} beside it)")


def job(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build every listed DiT class tiny and check it through fastattn's public API."""
    listed = dit_classes()
    check_config(cfg, listed)
    torch.set_num_threads(cfg.cpu_threads)
    names = list(cfg.classes or listed)
    steps = [float(v) for v in cfg.timesteps]
    started, rows = time.perf_counter(), []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        rows.append(check_class(name, listed[name], steps))
        print(("pass" if rows[-1]["passed"] else f"fail: {rows[-1]['reason']}") + f" ({rows[-1]['seconds']:.1f} s)",
              flush=True)
    report(rows, Path(cfg.out), time.perf_counter() - started)
    return rows


main = hydra_app("coverage", job)

if __name__ == "__main__":
    main()
