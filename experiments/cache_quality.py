"""The quality cost of keeping a plan's caches in FP8 (``cache_dtype``) or host memory
(``cache_device``): the same plan's compressed samples with the caches as computed and with the
option, on the same seeds. Reports PSNR / SSIM / relative error of the second set against the
first (the option's own error, the plan's left out), and FID-small / IS-small of both.

Writes ``cache_quality.json`` and ``samples/{exact,cached}/`` (a re-run resumes) and prints a table.

    python -m experiments.cache_quality threshold=d4 samples.num=64    # built-in model, 50-step DPM-Solver, CFG
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fastattn import apply_fastattn, remove_fastattn
from fastattn.models import get_adapter
from fastattn.utils.io import atomic_write_json

from .infra.app import ConfigError, hydra_app
from .infra.config import FAMILIES, validate_config
from .infra.opening import open_job
from .stages.evaluate import mean_relative_error, small_metrics_apply
from .stages.fingerprint import sample_fingerprint
from .stages.generate import generate, sample_array
from .stages.search import find_or_search_plan


def check_cache_quality_config(cfg: DictConfig) -> None:
    if cfg.get("cache_dtype") is None and cfg.get("cache_device") is None:
        raise ConfigError("cache_quality: set cache_dtype (float8_e4m3fn) or cache_device (cpu): "
                          "there is nothing to compare the caches as computed with")
    if int(cfg.samples.num) < 2:
        raise ConfigError(f"cache_quality: samples.num must be >= 2, got {cfg.samples.num}")


def measure(cfg: DictConfig, exact, cached) -> dict:
    """PSNR / SSIM / relative error of ``cached`` against ``exact``; FID-small / IS-small of each."""
    from . import metrics as m

    batch = int(cfg.metrics.feature_batch_size)
    out = {"psnr_db": m.compute_psnr(exact, cached, batch_size=batch),
           "ssim": m.compute_ssim(exact, cached, batch_size=batch),
           "mean_relative_error": mean_relative_error(exact, cached, batch_size=batch),
           "max_pixel_difference": int(max(abs(exact[i].astype(int) - cached[i].astype(int)).max()
                                           for i in range(len(exact)))),
           "identical_samples": sum(bool((exact[i] == cached[i]).all()) for i in range(len(exact)))}
    if small_metrics_apply(cfg):
        classifier = m.default_classifier()
        reference = m.small_reference_stats(classifier, int(cfg.metrics.small_reference_num),
                                            int(cfg.metrics.small_reference_seed), int(cfg.model.resolution))
        for name, images in (("exact", exact), ("cached", cached)):
            small = m.compute_small_metrics(images, classifier, reference, batch_size=batch)
            out.update({f"{key}_{name}": value for key, value in small.items()})
    return out


def run_cache_quality(cfg: DictConfig) -> dict:
    """Find or search the plan, generate both sample sets, measure; returns the record."""
    validate_config(cfg)
    check_cache_quality_config(cfg)
    out_dir, device, started, conditions, pipe = open_job(cfg)
    plan, source = find_or_search_plan(pipe, cfg, device, conditions)
    plan.check_model(get_adapter(pipe.transformer).describe(pipe.transformer), num_steps=int(cfg.solver.num_steps))
    indices = list(range(int(cfg.samples.num)))
    options = {"cache_dtype": cfg.get("cache_dtype"), "cache_device": cfg.get("cache_device")}
    for name, store in (("exact", {}), ("cached", options)):
        apply_fastattn(pipe, plan, **store)
        try:
            generate(pipe, conditions, indices, out_dir / "samples" / name, desc=name, seed=int(cfg.samples.seed),
                     num_steps=int(cfg.solver.num_steps), guidance_scale=float(cfg.guidance_scale),
                     batch_size=int(cfg.samples.batch_size), device=device,
                     fingerprint=sample_fingerprint(cfg, plan) | {"cache_store": store})
        finally:
            remove_fastattn(pipe)
    exact, cached = (sample_array(out_dir / "samples" / name, indices) for name in ("exact", "cached"))
    record = {"kind": "cache_quality", "model": cfg.model.name, "solver": cfg.solver.name,
              "num_steps": int(cfg.solver.num_steps), "guidance_scale": float(cfg.guidance_scale),
              "threshold": cfg.threshold.name, "plan_source": source, "counts": plan.counts(),
              "attn_flops_fraction": plan.attention_flops()["fraction"], "num_samples": len(indices), **options,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(cfg.model.dtype), **measure(cfg, exact, cached),
              "wall_seconds": time.perf_counter() - started}
    atomic_write_json(out_dir / "cache_quality.json", record)
    print(summary(record, out_dir))
    return record


def summary(r: dict, out_dir: Path) -> str:
    what = ", ".join(f"{k}={r[k]}" for k in ("cache_dtype", "cache_device") if r[k] is not None)
    lines = [f"cache_quality | {r['model']} | {r['solver']}, {r['num_steps']} steps, CFG {r['guidance_scale']} | "
             f"{r['threshold']} (attn FLOPs {r['attn_flops_fraction']:.3f}) | {r['num_samples']} samples | {r['device']}",
             f"{what} against caches as computed ({r['dtype']}), same plan and seeds:",
             f"  PSNR {r['psnr_db']:.2f} dB  SSIM {r['ssim']:.4f}  rel. error {r['mean_relative_error']:.5f}  "
             f"max pixel difference {r['max_pixel_difference']}/255  identical samples {r['identical_samples']}"]
    if "fid_small_exact" in r:
        lines.append(f"  FID-small {r['fid_small_exact']:.2f} (exact) / {r['fid_small_cached']:.2f} (cached)   "
                     f"IS-small {r['is_small_exact']:.2f} / {r['is_small_cached']:.2f}")
    lines.append(f"  outputs {out_dir}")
    return "\n".join(lines)


ACCEPTS = {"model": {"family": FAMILIES}}
main = hydra_app("cache_quality", run_cache_quality, accepts=ACCEPTS)

if __name__ == "__main__":
    main()
