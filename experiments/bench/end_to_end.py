"""Tables 3-4 on random weights: the denoising loop (50-step DPM-Solver, CFG) of the raw model
and of plans at chosen attention-FLOPs fractions, with attention latency and peak memory."""

from __future__ import annotations

import torch

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.kernels import prefer_fast_dense
from fastattn.models import get_adapter
from fastattn.models.solvers import make_scheduler
from fastattn.search.recipe import plan_at_fraction

from ..latency import AttentionTimer
from ..timing import time_ms, timer_name


def denoise(bm, steps: int, guidance: float, solver: str = "dpm_solver") -> torch.Tensor:
    """One generation of ``bm.images`` images: the pipelines' CFG loop, transformer + scheduler."""
    scheduler = make_scheduler(solver)
    scheduler.set_timesteps(steps)
    x = bm.latents()
    kwargs = bm.forward_kwargs(2 * bm.images)
    device = x.device
    for t in scheduler.timesteps:
        inp = torch.cat([x, x])
        out = bm.transformer(inp, timestep=t.to(device).expand(inp.shape[0]), return_dict=False, **kwargs)[0]
        eps = out[:, : x.shape[1]]
        cond, uncond = eps.chunk(2)  # timing does not depend on which half is which
        eps = uncond + guidance * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def model_info(bm) -> dict:
    return {**get_adapter(bm.transformer).describe(bm.transformer), "seq_len": bm.seq_len}


def plans_for(bm, steps: int, fractions, plan_files: dict | None = None) -> dict[str, CompressionPlan]:
    """Recipe plans at each fraction, plus any searched plan files (name -> path)."""
    plans = {f"recipe_{f:g}": plan_at_fraction(f, steps, model_info(bm)) for f in fractions}
    for name, path in (plan_files or {}).items():
        plans[name] = CompressionPlan.load(path)
    return plans


def measure(bm, plan: CompressionPlan | None, steps: int, guidance: float, device, warmup: int, repeats: int,
            cuda_graphs: bool = False) -> dict:
    """Loop latency (and peak memory over warm-up and timed runs), then attention latency from
    one more eager run with timing hooks. With ``cuda_graphs`` the raw model runs as an all-full
    plan (each layer calls the model's own processor) so raw and compressed replay graphs alike."""
    if cuda_graphs and plan is None:
        info = model_info(bm)
        plan = CompressionPlan.all_full(steps, info["num_layers"])
    if plan is not None:
        handle = apply_fastattn(bm.transformer, plan, cuda_graphs=cuda_graphs)
    try:
        with torch.no_grad(), prefer_fast_dense():
            run = lambda: denoise(bm, steps, guidance)  # noqa: E731
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            total = time_ms(run, device, warmup, repeats)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            graph_stats = dict(handle.graphs.stats) if cuda_graphs else None
            if cuda_graphs:
                handle.graphs.enabled = False  # the timing hooks record events: not inside a graph
            with AttentionTimer(bm.transformer, device) as timer:
                run()
            attention = timer.watch.ms()
    finally:
        if plan is not None:
            remove_fastattn(bm.transformer)
    return {"loop_ms": total, "attention_ms": attention, "peak_bytes": peak, "timer": timer_name(device),
            "cuda_graphs": cuda_graphs, "graph_stats": graph_stats}


def run_end_to_end(bm, fractions, steps: int, guidance: float, device, warmup: int, repeats: int,
                   plan_files: dict | None = None, graph_modes=(False,)) -> list[dict]:
    """Raw and every plan, in each mode of ``graph_modes`` (False: eager, True: CUDA graphs);
    speed-ups are against the raw model in the same mode."""
    rows = []
    plans = plans_for(bm, steps, fractions, plan_files)
    for graphs in graph_modes:
        raw = measure(bm, None, steps, guidance, device, warmup, repeats, graphs)
        rows.append({"model": bm.name, "seq_len": bm.seq_len, "plan": "raw", "flops_fraction": 1.0, **raw,
                     "speedup": 1.0, "attention_speedup": 1.0,
                     "memory_ratio": 1.0 if raw["peak_bytes"] else None})
        for name, plan in plans.items():
            r = measure(bm, plan, steps, guidance, device, warmup, repeats, graphs)
            rows.append({"model": bm.name, "seq_len": bm.seq_len, "plan": name,
                         "flops_fraction": plan.attention_flops(bm.seq_len)["fraction"], **r,
                         "speedup": raw["loop_ms"] / r["loop_ms"],
                         "attention_speedup": raw["attention_ms"] / max(r["attention_ms"], 1e-9),
                         "memory_ratio": (r["peak_bytes"] / raw["peak_bytes"]) if raw["peak_bytes"] else None,
                         "counts": plan.counts()})
    return rows
