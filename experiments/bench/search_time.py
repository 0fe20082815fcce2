"""Table 6 on random weights: the wall time of DiTFastAttn's plan search (Algorithm 1, and the fast
search beside it: ``algorithms``) on the paper's architectures, against one raw generation of the
same batch.

    python -m experiments.bench.search_time                       # DiT-XL 512, PixArt 1K / 2K
    python -m experiments.bench.search_time 'models=[{name: tiny_dit, arch: tiny_dit, resolution: 64, steps: 4}]' device=cpu dtype=float32

Every (model, threshold, algorithm) writes ``<output_dir>/<model>_<row>[_fast]/metrics.json`` in the main job's
layout (``plan.search_seconds``, ``plan.search_raw_generations``: the work the search counted, in
raw generations of the batch; ``raw_latency_s``), so ``python -m analysis.tables <output_dir>``
prints Table 6 from these runs. Random weights change which trials pass, so the search time is
that of these weights, not of the checkpoint's; a model run with fewer than 50 steps also records
``search_seconds_per_step`` and the 50-step estimate from it (``estimated_50_step_search_s``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn.kernels import prefer_fast_dense
from fastattn.search.greedy import SEARCHES, search_plan
from fastattn.utils.io import atomic_write_json
from fastattn.utils.paths import path_inside, slug

from ..infra.app import ConfigError, hydra_app, resolve_device
from ..infra.timing import Stopwatch, time_ms
from ..models.loaders import parse_dtype
from ..models.solvers import make_scheduler
from .architectures import ARCHITECTURES, build
from .end_to_end import denoise_with

PAPER_STEPS = 50


class BenchPipeline:
    """The smallest pipeline a search runs on: ``.transformer``, ``.scheduler`` and ``__call__``
    running the CFG loop of :func:`denoise_with` (batch and inputs from the BenchModel)."""

    def __init__(self, bm, solver: str):
        self.bm, self.transformer, self.scheduler = bm, bm.transformer, make_scheduler(solver)

    def __call__(self, num_inference_steps: int, guidance_scale: float):
        with torch.no_grad():
            return denoise_with(self.bm, self.scheduler, num_inference_steps, guidance_scale)


def check(cfg: DictConfig) -> None:
    if not cfg.models:
        raise ConfigError("search_time: models is empty")
    for m in cfg.models:
        if m.arch not in ARCHITECTURES:
            raise ConfigError(f"search_time: unknown arch {m.arch!r} (known: {', '.join(ARCHITECTURES)})")
        if int(m.steps) < 2:
            raise ConfigError(f"search_time: {m.name}: steps must be >= 2 (step 0 is never searched), got {m.steps}")
    for name in cfg.thresholds:
        delta_of(name)
    for algorithm in cfg.algorithms:
        if algorithm not in SEARCHES:
            raise ConfigError(f"search_time: algorithms holds {algorithm!r}; known: {', '.join(SEARCHES)}")


def delta_of(row: str) -> float:
    """The paper's rows: raw (delta 0: every trial fails) and Dk (delta 0.025 k)."""
    if row == "raw":
        return 0.0
    if match := re.fullmatch(r"d(\d+)", str(row)):
        return 0.025 * int(match.group(1))
    raise ConfigError(f"search_time: thresholds holds {row!r}; rows are raw or d<k> (delta 0.025 k)")


def timed(fn, device) -> tuple[float, object]:
    """Seconds of one call of ``fn`` on the synchronised wall clock, and what it returned."""
    watch = Stopwatch(device, clock="wall")
    watch.start()
    out = fn()
    watch.stop()
    return watch.ms() / 1e3, out


def measure_model(m, cfg, device, dtype, out_dir: Path) -> list[dict]:
    bm = build(m.arch, int(m.resolution), int(cfg.images), device, dtype, seed=int(cfg.seed))
    pipe = BenchPipeline(bm, cfg.solver)
    steps, guidance = int(m.steps), float(cfg.guidance)
    raw_s = time_ms(lambda: pipe(steps, guidance), device, warmup=1, repeats=2, clock="wall") / 1e3
    rows = []
    for row, algorithm in ((r, a) for r in cfg.thresholds for a in cfg.algorithms):
        delta = delta_of(row)
        seconds, plan = timed(lambda: search_plan(pipe, {"num_inference_steps": steps, "guidance_scale": guidance},
                                                  threshold=float(delta), window_size=float(cfg.window_size),
                                                  progress=bool(cfg.progress), algorithm=algorithm), device)
        per_step = seconds / (steps - 1)  # step 0 is full without trials
        record = {
            "kind": "run", "technique": "all", "solver": f"{cfg.solver}_{PAPER_STEPS}" if steps == PAPER_STEPS
            else f"{cfg.solver}_{steps}", "model": m.name, "threshold_name": row, "threshold": float(delta),
            "weights": "random", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "images": int(cfg.images), "steps": steps, "raw_latency_s": raw_s,
            "plan": {"search_algorithm": plan.search["algorithm"], "search_seconds": seconds,
                     "search_raw_generations": plan.search["cost"]["raw_generations"],
                     "flops_fraction": plan.attention_flops(bm.seq_len)["fraction"], "counts": plan.counts()},
            "search_generations": seconds / raw_s, "search_seconds_per_step": per_step,
            "config": {"model": {"name": m.name, "resolution": int(m.resolution), "family": bm.family}},
        }
        if steps != PAPER_STEPS:  # the trials per step do not depend on the step count; their outcomes do
            record["estimated_50_step_search_s"] = per_step * (PAPER_STEPS - 1)
        name = f"{m.name}_{row}" + ("" if algorithm == "greedy" else f"_{algorithm}")  # Algorithm 1's folders as before
        atomic_write_json(path_inside(out_dir, slug(name), "metrics.json"), record)
        rows.append(record)
        print(f"{m.name:<24} {row:<4} {algorithm:<6} search {seconds:8.1f} s  raw {raw_s:6.2f} s  {seconds / raw_s:7.1f} generations "
              f"(counted {record['plan']['search_raw_generations']:.1f})  "
              f"attention FLOPs {record['plan']['flops_fraction']:.3f}", flush=True)
    return rows


def search_time(cfg: DictConfig) -> list[dict]:
    check(cfg)
    device = resolve_device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    out_dir = Path(cfg.output_dir)
    rows = []
    with prefer_fast_dense():
        for m in cfg.models:
            rows += measure_model(m, cfg, device, dtype, out_dir)
            if device.type == "cuda":  # the model measured is gone: its memory to the next one
                torch.cuda.empty_cache()
    atomic_write_json(out_dir / "search_time.json", {"config": OmegaConf.to_container(cfg, resolve=True),
                                                     "rows": rows})
    return rows


main = hydra_app("search_time", search_time)

if __name__ == "__main__":
    main()
