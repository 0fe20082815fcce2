"""Where a denoising loop's time goes: one 50-step CFG loop of a benchmark architecture (random
weights) under torch.profiler, raw or with a recipe plan, eager or with CUDA graphs.

    python -m experiments.profile_loop arch=dit_xl_2 resolution=512 images=8 fraction=0.34 cuda_graphs=true

Prints the loop's wall time, the GPU's busy time (sum of kernel times) and the top kernels;
``out=FILE`` also writes the table. A GPU that is idle for much of the loop means the host is the bound.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.kernels import prefer_fast_dense
from fastattn.search.recipe import plan_at_fraction

from .bench.architectures import ARCHITECTURES, build
from .bench.end_to_end import denoise, model_info
from .infra.app import hydra_app, resolve_device
from .infra.config import DTYPES, check_bool, check_choice, check_device, check_fraction, check_int
from .infra.timing import synchronize, time_ms


def check_config(cfg: DictConfig) -> None:
    check_choice(cfg, "arch", list(ARCHITECTURES))
    check_int(cfg, "resolution", "images", "steps", "rows")
    check_fraction(cfg, "fraction", optional=True)
    check_choice(cfg, "dtype", DTYPES)
    check_bool(cfg, "cuda_graphs")
    check_device(cfg, needs_cuda="cuda_graphs=true" if cfg.cuda_graphs else None)


def profile_loop(cfg: DictConfig) -> dict:
    from torch.profiler import ProfilerActivity, profile

    check_config(cfg)
    device = resolve_device(cfg.device)
    bm = build(cfg.arch, cfg.resolution, cfg.images, device, getattr(torch, cfg.dtype))
    plan = None
    if cfg.fraction is not None:
        plan = plan_at_fraction(cfg.fraction, cfg.steps, model_info(bm))
    elif cfg.cuda_graphs:
        plan = CompressionPlan.all_full(cfg.steps, model_info(bm)["num_layers"])
    if plan is not None:
        apply_fastattn(bm.transformer, plan, cuda_graphs=cfg.cuda_graphs)
    cuda = device.type == "cuda"
    with torch.no_grad(), prefer_fast_dense():
        for _ in range(2):  # warm-up: compile, capture
            denoise(bm, cfg.steps, 4.5)
        synchronize(device)  # the warm-up's kernels stay out of the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            wall = time_ms(lambda: denoise(bm, cfg.steps, 4.5), device, 0, 1, clock="wall") / 1e3
    if plan is not None:
        remove_fastattn(bm.transformer)
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernels) / 1e6 if cuda else None
    table = events.table(sort_by="self_" + attr if cuda else "self_cpu_time_total", row_limit=cfg.rows,
                         max_name_column_width=70)
    print(table)
    summary = {"wall_s": wall, "gpu_busy_s": busy, "plan": None if plan is None else plan.counts()}
    print(summary)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(table + "\n" + repr(summary) + "\n")
    return summary


main = hydra_app("profile_loop", profile_loop)

if __name__ == "__main__":
    main()
