"""Tables 3-4 on random weights: the denoising loop (50-step DPM-Solver, CFG) of the raw model
and of plans at chosen attention-FLOPs fractions, with attention latency and peak memory.

Raw and compressed run on the same dense kernel (:func:`prefer_fast_dense`: FlashAttention-4
where it runs, else cuDNN first). Where FA4 runs, the raw model is measured once more on cuDNN
(``raw_cudnn``, the baseline before FA4). Each plan's speed-up is against raw on the best dense
kernel, with the ideal 1 / ((1 - a) + a·f) for the raw attention share a of the same run."""

from __future__ import annotations

import contextlib

import torch

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from fastattn.compile import compile_blocks
from fastattn.kernels import fa4, fa4_mode, prefer_fast_dense
from fastattn.models import get_adapter
from fastattn.search.recipe import plan_at_fraction

from ..infra.timing import time_ms, timer_name
from ..models.solvers import make_scheduler
from ..stages.latency import AttentionTimer


def denoise(bm, steps: int, guidance: float, solver: str = "dpm_solver") -> torch.Tensor:
    """One generation of ``bm.images`` images: the pipelines' CFG loop, transformer + scheduler."""
    return denoise_with(bm, make_scheduler(solver), steps, guidance)


def denoise_with(bm, scheduler, steps: int, guidance: float) -> torch.Tensor:
    """:func:`denoise` on a given scheduler (a pipeline's, whose ``set_timesteps`` fastattn watches)."""
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


COMPILE_MODES = ("whole", "blocks")  # torch.compile of the whole transformer, or block by block


@contextlib.contextmanager
def compiled(transformer, how: str | None, backend: str = "inductor", mode: str | None = None):
    """The transformer compiled ``how`` (None: eager) inside the block, uncompiled after it. Graphs
    are built during each measurement's warm-up generation (one per step layout or layer
    decision, :func:`fastattn.compile.graphs_needed`) and replayed in the timed ones."""
    if how is None:
        yield
        return
    if how not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} or null, got {how!r}")
    kwargs = {"backend": backend, **({"mode": mode} if mode else {})}
    modules = [transformer] if how == "whole" else get_adapter(transformer).blocks(transformer)
    if how == "whole":
        transformer.compile(**kwargs)
    else:
        compile_blocks(transformer, **kwargs)
    try:
        yield
    finally:
        for m in modules:
            m._compiled_call_impl = None  # what nn.Module.compile set
        torch._dynamo.reset()


def measure(bm, plan: CompressionPlan | None, steps: int, guidance: float, device, warmup: int, repeats: int,
            cuda_graphs: bool = False, time_attention: bool = True, cache_dtype: str | None = None,
            cache_device: str | None = None) -> dict:
    """Loop latency (and peak memory over the timed runs, after the warm-up ones: FlexAttention
    compiles and CUDA graphs are captured there), then attention latency from
    one more eager run with timing hooks. With ``cuda_graphs`` the raw model runs as an all-full
    plan (each layer calls the model's own processor) so raw and compressed replay graphs alike.
    ``time_attention=False`` (a compiled transformer: hooks inside compiled code would recompile
    it, and an eager stance would run the windowed kernels' compiled FlexAttention eagerly too)
    leaves ``attention_ms`` None."""
    if cuda_graphs and plan is None:
        info = model_info(bm)
        plan = CompressionPlan.all_full(steps, info["num_layers"])
    if plan is not None:
        handle = apply_fastattn(bm.transformer, plan, cuda_graphs=cuda_graphs, cache_dtype=cache_dtype,
                                cache_device=cache_device)
    try:
        with torch.no_grad(), prefer_fast_dense():
            run = lambda: denoise(bm, steps, guidance)  # noqa: E731
            for _ in range(warmup):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            total = time_ms(run, device, 0, repeats)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            graph_stats = dict(handle.graphs.stats) if cuda_graphs else None
            if cuda_graphs:
                handle.graphs.enabled = False  # the timing hooks record events: not inside a graph
            attention = None
            if time_attention:
                with AttentionTimer(bm.transformer, device) as timer:
                    run()
                attention = timer.watch.ms()
    finally:
        if plan is not None:
            remove_fastattn(bm.transformer)
    return {"loop_ms": total, "attention_ms": attention, "peak_bytes": peak, "timer": timer_name(device),
            "cuda_graphs": cuda_graphs, "graph_stats": graph_stats}


def caches_label(plan: str, cache_dtype: str | None, cache_device: str | None) -> str:
    """A row's plan name with how its caches were kept: ``recipe_0.24+float8_e4m3fn+host``."""
    return plan + (f"+{cache_dtype}" if cache_dtype else "") + ("+host" if cache_device else "")


def no_attention_plan(steps: int, layers: int) -> CompressionPlan:
    """Step 0 full, every later layer ``ast`` (its cached output): the loop without attention but step 0's."""
    return CompressionPlan([[Method.FULL] * layers] + [[Method.AST] * layers for _ in range(steps - 1)])


def plan_share(bm, steps: int, guidance: float, device, warmup: int, repeats: int, graphs: bool,
               raw_ms: float) -> float:
    """Attention share a of the raw loop from the loop without attention, in the same mode (under
    CUDA graphs the timing hooks' eager run would count host time as attention)."""
    t = measure(bm, no_attention_plan(steps, model_info(bm)["num_layers"]), steps, guidance, device, warmup,
                repeats, graphs)["loop_ms"]
    return share_from_loops(raw_ms, t, steps)


def share_from_loops(raw: float, without: float, steps: int) -> float:
    """Attention share a of a raw loop from the same loop without attention after step 0 (which
    still attends, so the difference is scaled up to all ``steps``)."""
    return max(0.0, min(1.0, (raw - without) * steps / (steps - 1) / raw))


def run_end_to_end(bm, fractions, steps: int, guidance: float, device, warmup: int, repeats: int,
                   plan_files: dict | None = None, graph_modes=(False,), raw_cudnn: bool = True,
                   share_from_plan: bool = False, compile_modes=(None,), compile_backend: str = "inductor",
                   compile_mode: str | None = None, cache_dtypes=(None,), cache_devices=(None,)) -> list[dict]:
    """Raw and every plan, in each mode of ``graph_modes`` (False: eager, True: CUDA graphs) and
    of ``compile_modes`` (None: not compiled; "whole" / "blocks": torch.compile with
    ``compile_backend`` and ``compile_mode``), each plan with each of ``cache_dtypes`` (None:
    caches as computed; "float8_e4m3fn") in each of ``cache_devices`` (None: beside the model;
    "cpu": host memory, not under CUDA graphs); speed-ups and memory ratios are against the raw
    model in the same mode. fastattn's CUDA graphs and torch.compile are alternatives: their
    combination is skipped."""
    rows = []
    for how in compile_modes:
        for graphs in graph_modes:
            if graphs and how is not None:
                continue
            with compiled(bm.transformer, how, compile_backend, compile_mode):
                # compiled: no attention timer, so a comes from the loop without attention
                mode_rows = _rows_in_mode(bm, fractions, steps, guidance, device, warmup, repeats, plan_files,
                                          graphs, raw_cudnn, share_from_plan or how is not None, how is None,
                                          cache_dtypes, cache_devices)
            rows += [dict(r, compile=how) for r in mode_rows]
    return rows


def _attention_speedup(raw: dict, row: dict) -> float | None:
    if raw["attention_ms"] is None or row["attention_ms"] is None:
        return None
    return raw["attention_ms"] / max(row["attention_ms"], 1e-9)


def _rows_in_mode(bm, fractions, steps, guidance, device, warmup, repeats, plan_files, graphs, raw_cudnn,
                  share_from_plan, time_attention=True, cache_dtypes=(None,), cache_devices=(None,)) -> list[dict]:
    rows = []
    plans = plans_for(bm, steps, fractions, plan_files)
    probe = bm.latents()
    on_fa4 = fa4.enabled_for(probe.new_empty(1, 1, 1, bm.transformer.config.attention_head_dim))
    raw = measure(bm, None, steps, guidance, device, warmup, repeats, graphs, time_attention)
    timer_share = min(1.0, raw["attention_ms"] / raw["loop_ms"]) if time_attention else None  # a, same run
    share = plan_share(bm, steps, guidance, device, warmup, repeats, graphs, raw["loop_ms"]) \
        if share_from_plan else timer_share
    kernel = "fa4" if on_fa4 else "sdpa"
    rows.append({"model": bm.name, "seq_len": bm.seq_len, "plan": "raw", "flops_fraction": 1.0, **raw,
                 "dense_kernel": kernel, "speedup": 1.0, "attention_speedup": 1.0, "attention_share": share,
                 "attention_share_source": "no_attention_plan" if share_from_plan else "timer",
                 "attention_share_timer": timer_share, "memory_ratio": 1.0 if raw["peak_bytes"] else None})
    if on_fa4 and raw_cudnn:  # the baseline before FA4, for history: same loop, cuDNN dense
        with fa4_mode("off"):
            cudnn = measure(bm, None, steps, guidance, device, warmup, repeats, graphs, time_attention)
        rows.append({"model": bm.name, "seq_len": bm.seq_len, "plan": "raw_cudnn", "flops_fraction": 1.0,
                     **cudnn, "dense_kernel": "sdpa", "speedup": raw["loop_ms"] / cudnn["loop_ms"],
                     "attention_speedup": _attention_speedup(raw, cudnn),
                     "memory_ratio": (cudnn["peak_bytes"] / raw["peak_bytes"]) if raw["peak_bytes"] else None})
    for (name, plan), cache_dtype, cache_device in ((p, c, d) for p in plans.items() for c in cache_dtypes
                                                    for d in cache_devices):
        if graphs and cache_device is not None:
            continue  # host caches do not run under CUDA graphs
        r = measure(bm, plan, steps, guidance, device, warmup, repeats, graphs, time_attention, cache_dtype,
                    cache_device)
        f = plan.attention_flops(bm.seq_len)["fraction"]
        ideal = 1 / ((1 - share) + share * f)
        rows.append({"model": bm.name, "seq_len": bm.seq_len, "plan": caches_label(name, cache_dtype, cache_device),
                     "cache_dtype": cache_dtype, "cache_device": cache_device, "flops_fraction": f, **r,
                     "dense_kernel": kernel, "speedup": raw["loop_ms"] / r["loop_ms"],
                     "attention_speedup": _attention_speedup(raw, r),
                     "ideal_speedup": ideal, "of_ideal": raw["loop_ms"] / r["loop_ms"] / ideal,
                     "memory_ratio": (r["peak_bytes"] / raw["peak_bytes"]) if raw["peak_bytes"] else None,
                     "counts": plan.counts()})
    return rows
