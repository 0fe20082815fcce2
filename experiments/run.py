"""The main job: search a plan, generate raw and compressed samples with the same seeds, compare.

Writes into the Hydra run directory: ``plan.json``, ``samples/{raw,fastattn}/`` (PNGs and a
manifest; re-running into the same directory resumes), ``samples_grid.png`` (raw row above the
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

import torch

from fastattn import apply_fastattn, remove_fastattn
from fastattn.models import get_adapter
from fastattn.utils.io import atomic_save_image, atomic_write_json

from .conditions import pipeline_inputs, to_device
from .config import validate_config
from .evaluate import comparison_grid, mean_relative_error, psnr
from .generate import generate, load_samples
from .pipelines import build_pipeline, resolve_device
from .search import find_or_search_plan


def run(cfg: DictConfig) -> dict:
    validate_config(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    steps, guidance = int(cfg.solver.num_steps), float(cfg.guidance_scale)

    pipe = build_pipeline(cfg.model, cfg.solver, device)
    plan, plan_source = find_or_search_plan(pipe, cfg, device)
    plan.check_model(pipe_model_info(pipe), num_steps=steps)
    plan.save(out_dir / "plan.json")

    sample_args = dict(seed=int(cfg.samples.seed), num_steps=steps, guidance_scale=guidance,
                       batch_size=int(cfg.samples.batch_size), device=device)
    indices = list(range(cfg.samples.num))
    folders = {"raw": out_dir / "samples" / "raw", "fastattn": out_dir / "samples" / "fastattn"}

    if cfg.samples.warmup:
        warm_up(pipe, cfg.model, indices[: cfg.samples.batch_size], **sample_args)
    raw_run = generate(pipe, cfg.model, indices, folders["raw"], desc="raw", **sample_args)
    apply_fastattn(pipe, plan)
    try:
        if cfg.samples.warmup:
            warm_up(pipe, cfg.model, indices[: cfg.samples.batch_size], **sample_args)
        comp_run = generate(pipe, cfg.model, indices, folders["fastattn"], desc="fastattn", **sample_args)
    finally:
        remove_fastattn(pipe)
    raw, compressed = (load_samples(folders[k], indices) for k in ("raw", "fastattn"))

    flops = plan.attention_flops()
    metrics = {
        "kind": "run",
        "model": cfg.model.name,
        "solver": cfg.solver.name,
        "threshold": float(cfg.threshold.delta),
        "threshold_name": cfg.threshold.name,
        "technique": cfg.technique.name,
        "num_samples": len(indices),
        "seq_len": flops["seq_len"],
        "attn_flops_fraction": flops["fraction"],
        "attn_core_flops_fraction": flops["core_fraction"],
        "method_counts": plan.counts(),
        "sample_mean_relative_error": mean_relative_error(raw, compressed),
        "sample_psnr_db": psnr(raw, compressed),
        "raw_latency_s": per_sample(raw_run),
        "latency_s": per_sample(comp_run),
        "generated": {"raw": raw_run, "fastattn": comp_run},
        "plan_source": plan_source,
        "search_seconds": plan.search.get("seconds"),
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_save_image(out_dir / "samples_grid.png", comparison_grid({"raw": raw, "fastattn": compressed}))
    atomic_write_json(out_dir / "metrics.json", metrics)
    print(format_summary(metrics, out_dir))
    return metrics


def pipe_model_info(pipe) -> dict:
    return get_adapter(pipe.transformer).describe(pipe.transformer)


def warm_up(pipe, model, indices, *, seed, num_steps, guidance_scale, batch_size, device) -> None:
    """One untimed, unsaved generation: kernel compilation and allocator warm-up."""
    with torch.no_grad():
        pipe(**to_device(pipeline_inputs(model, indices, seed, num_steps, guidance_scale), device))


def per_sample(run_stats: dict) -> float | None:
    """Seconds per generated sample; None when a resumed run generated nothing new."""
    return run_stats["seconds"] / run_stats["generated"] if run_stats["generated"] else None


def format_summary(m: dict, out_dir: Path) -> str:
    rows = [
        ("attention FLOPs fraction", f"{m['attn_flops_fraction']:.3f}  (core {m['attn_core_flops_fraction']:.3f})"),
        ("methods (step x layer)", json.dumps(m["method_counts"])),
        ("sample rel. error vs raw", f"{m['sample_mean_relative_error']:.4f}"),
        ("sample PSNR vs raw", f"{m['sample_psnr_db']:.2f} dB"),
        ("s/sample raw / fastattn", f"{_fmt(m['raw_latency_s'])} / {_fmt(m['latency_s'])}"),
        ("plan", f"{m['plan_source']}" + (f", search {m['search_seconds']:.1f} s" if m["plan_source"] == "search" else "")),
        ("outputs", str(out_dir)),
    ]
    head = f"fastattn | {m['model']} | {m['solver']} | delta={m['threshold']} | {m['technique']} | {m['device']}"
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])


def _fmt(seconds: float | None) -> str:
    return "resumed" if seconds is None else f"{seconds:.4f}"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
