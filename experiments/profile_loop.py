"""Where a denoising loop's time goes: one 50-step CFG loop of a benchmark architecture (random
weights) under torch.profiler, raw or with a recipe plan, eager or with CUDA graphs.

    python -m experiments.profile_loop --arch dit_xl_2 --resolution 512 --images 8 --fraction 0.34 --cuda-graphs

Prints the loop's wall time, the GPU's busy time (sum of kernel times) and the top kernels;
``--out`` also writes the table. A GPU that is idle for much of the loop means the host is the bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.kernels import prefer_fast_dense
from fastattn.search.recipe import plan_at_fraction

from .bench.architectures import build
from .bench.end_to_end import denoise, model_info
from .timing import synchronize, time_ms


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="dit_xl_2")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=None, help="recipe plan at this attention FLOPs fraction; "
                    "none: the raw model")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None, help="file for the kernel table")
    args = ap.parse_args(argv)
    if args.fraction is not None and not 0 < args.fraction <= 1:
        ap.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        ap.error("--cuda-graphs needs --device cuda")
    return args


def main(argv=None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    args = parse_args(argv)
    device = torch.device(args.device)
    bm = build(args.arch, args.resolution, args.images, device, getattr(torch, args.dtype))
    plan = None
    if args.fraction is not None:
        plan = plan_at_fraction(args.fraction, args.steps, model_info(bm))
    elif args.cuda_graphs:
        plan = CompressionPlan.all_full(args.steps, model_info(bm)["num_layers"])
    if plan is not None:
        apply_fastattn(bm.transformer, plan, cuda_graphs=args.cuda_graphs)
    cuda = device.type == "cuda"
    with torch.no_grad(), prefer_fast_dense():
        for _ in range(2):  # warm-up: compile, capture
            denoise(bm, args.steps, 4.5)
        synchronize(device)  # the warm-up's kernels stay out of the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            wall = time_ms(lambda: denoise(bm, args.steps, 4.5), device, 0, 1, clock="wall") / 1e3
    if plan is not None:
        remove_fastattn(bm.transformer)
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernels) / 1e6 if cuda else None
    table = events.table(sort_by="self_" + attr if cuda else "self_cpu_time_total", row_limit=args.rows,
                         max_name_column_width=70)
    print(table)
    summary = {"wall_s": wall, "gpu_busy_s": busy, "plan": None if plan is None else plan.counts()}
    print(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n" + repr(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
