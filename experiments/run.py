"""The main job: search a plan, generate raw and compressed samples with the same seeds, compare.

Writes into the Hydra run directory: ``plan.json``, ``samples_grid.png`` (raw row above the
compressed row) and ``metrics.json``; prints a short table.

    python -m experiments.run                                   # tiny DiT on the CPU
    python -m experiments.run model=pixart_sigma_xl_1024 threshold=d4
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fastattn import apply_fastattn, remove_fastattn, search_plan
from fastattn.utils.io import atomic_save_image, atomic_write_json

from .conditions import pipeline_inputs, to_device
from .config import validate_config
from .evaluate import comparison_grid, mean_relative_error, psnr
from .generate import generate
from .pipelines import build_pipeline, resolve_device


def run(cfg: DictConfig) -> dict:
    validate_config(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    steps, guidance = int(cfg.solver.num_steps), float(cfg.guidance_scale)

    pipe = build_pipeline(cfg.model, cfg.solver, device)

    calibration = to_device(
        pipeline_inputs(cfg.model, range(cfg.calibration.num_samples), cfg.calibration.seed, steps, guidance), device
    )
    plan = search_plan(
        pipe, calibration, threshold=float(cfg.threshold.delta), strategies=list(cfg.technique.strategies),
        window_fraction=float(cfg.window_fraction),
        metadata={"model_name": cfg.model.name, "solver": cfg.solver.name, "technique": cfg.technique.name,
                  "calibration_seed": int(cfg.calibration.seed)},
    )
    plan.save(out_dir / "plan.json")

    sample_args = dict(seed=int(cfg.samples.seed), num_steps=steps, guidance_scale=guidance,
                       batch_size=int(cfg.samples.batch_size), device=device)
    indices = range(cfg.samples.num)
    warmup = list(indices)[: cfg.samples.batch_size] if cfg.samples.warmup else []

    if warmup:
        generate(pipe, cfg.model, warmup, desc="warm-up raw", **sample_args)
    raw, raw_seconds = generate(pipe, cfg.model, indices, desc="raw", **sample_args)
    apply_fastattn(pipe, plan)
    try:
        if warmup:
            generate(pipe, cfg.model, warmup, desc="warm-up fastattn", **sample_args)
        compressed, comp_seconds = generate(pipe, cfg.model, indices, desc="fastattn", **sample_args)
    finally:
        remove_fastattn(pipe)

    flops = plan.attention_flops()
    n = len(raw)
    metrics = {
        "model": cfg.model.name,
        "solver": cfg.solver.name,
        "threshold": float(cfg.threshold.delta),
        "technique": cfg.technique.name,
        "num_samples": n,
        "seq_len": flops["seq_len"],
        "attn_flops_fraction": flops["fraction"],
        "attn_core_flops_fraction": flops["core_fraction"],
        "method_counts": plan.counts(),
        "sample_mean_relative_error": mean_relative_error(raw, compressed),
        "sample_psnr_db": psnr(raw, compressed),
        "seconds_per_sample_raw": raw_seconds / n,
        "seconds_per_sample_compressed": comp_seconds / n,
        "search_seconds": plan.search["seconds"],
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_save_image(out_dir / "samples_grid.png", comparison_grid({"raw": raw, "fastattn": compressed}))
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(format_summary(metrics, out_dir))
    return metrics


def format_summary(m: dict, out_dir: Path) -> str:
    rows = [
        ("attention FLOPs fraction", f"{m['attn_flops_fraction']:.3f}  (core {m['attn_core_flops_fraction']:.3f})"),
        ("methods (step x layer)", json.dumps(m["method_counts"])),
        ("sample rel. error vs raw", f"{m['sample_mean_relative_error']:.4f}"),
        ("sample PSNR vs raw", f"{m['sample_psnr_db']:.2f} dB"),
        ("s/sample raw / fastattn", f"{m['seconds_per_sample_raw']:.4f} / {m['seconds_per_sample_compressed']:.4f}"),
        ("search", f"{m['search_seconds']:.1f} s"),
        ("outputs", str(out_dir)),
    ]
    head = f"fastattn | {m['model']} | {m['solver']} | delta={m['threshold']} | {m['technique']} | {m['device']}"
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
