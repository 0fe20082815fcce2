"""fastattn on top of diffusers' context parallelism, against the raw model on the same split.

    torchrun --nproc_per_node 8 -m experiments.benchmark_context out=outputs/bench_context            # GPU
    torchrun --nproc_per_node 8 -m experiments.benchmark_context models=[flux_dev_2k] out=...          # one model

Wan 2.1 T2V 14B at 720p x 81 frames and FLUX.1-dev at 2048², full size on random weights
(:mod:`.bench.zoo_shapes`), built on every rank's GPU. Per model, first on each rank alone (the
one-GPU baseline, all ranks at once, each on its own GPU): the raw forward, the attention share a
(benchmark_zoo's: the forward with every attention call answered by zeros), the recipe plan at
``target`` (benchmark_zoo's) and its attention-core FLOPs fraction f. Then for each split of
``splits`` (:mod:`.bench.context_splits`; default Ulysses W, ring W, Ulysses 2 x ring W/2) a fresh
model (diffusers cannot undo ``enable_parallelism``) is split over its context group
(:mod:`.infra.context_groups`) and timed: the raw forward and the raw ``steps``-call loop, then the
recipe plan's loop; all-full must equal raw bit for bit on the split (``torch.equal``), and the
plan's outputs' difference from raw is recorded. Under ring the band ring's steps and bytes per
window call are counted on every rank (:mod:`.bench.ring_traffic`) next to the communication
model's (:mod:`.bench.context_model`). Each timing: warm-up, then the median of repeats on the
synchronised wall clock, every rank starting together after a barrier; the slowest rank's median
is reported. The one-GPU loop is ``steps`` x the one-GPU forward (raw calls carry nothing).

Speed-ups: over raw on the same split, against the ideal 1 / ((1 - a) + a f); over one GPU,
against degree x that ideal. On a CPU it runs ``size=tiny device=cpu`` only (the tests, on gloo
ranks); ring there needs an attention backend that returns the log-sum-exp.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastattn import CompressionPlan, apply_fastattn, describe, remove_fastattn
from fastattn.cache_store import parse_cache_options
from fastattn.kernels import prefer_fast_dense
from fastattn.models import get_adapter
from fastattn.utils.io import atomic_write_bytes, atomic_write_json

from .bench.context_model import AttentionShape, band_ring_bytes, band_steps, dense_ring_bytes, shard_bytes
from .bench.context_splits import check_splits, read_splits
from .bench.per_model import check_run_settings
from .bench.ring_traffic import RingTraffic
from .bench.zoo_shapes import build, step_inputs
from .benchmark_zoo import CallShapes, ZeroAttention, calls_tokens, core_fraction, recipe
from .infra import distributed
from .infra.app import ConfigError, hydra_app, resolve_device
from .infra.config import check_device, use_fa4
from .infra.context_groups import context_groups
from .infra.timing import synchronize, time_ms

MODELS = ("wan_14b_720p", "flux_dev_2k")
JSON = "benchmark_context.json"


def timed(fn, cfg: DictConfig, device: torch.device, loop: bool = False, before=None) -> float:
    """The slowest rank's median seconds of ``fn()``; every run starts on all ranks together."""
    def start():
        if before is not None:
            before()
        synchronize(device)
        distributed.barrier()
    warmup, repeats = (cfg.loop_warmup, cfg.loop_repeats) if loop else (cfg.warmup, cfg.repeats)
    seconds = time_ms(fn, device, warmup, repeats, clock="wall", before=start) / 1e3
    return max(distributed.all_gather(seconds))


def sample(transformer, call: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**call, return_dict=False)[0]


def one_gpu(model: str, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """The unsplit model on each rank: its forward, attention share, call shapes and recipe plan."""
    transformer, inputs = build(model, cfg.size, device, dtype)
    info, adapter = describe(transformer), get_adapter(transformer)
    calls = [step_inputs(inputs, info.timestep_arg, s, cfg.steps) for s in range(cfg.steps)]
    shapes = CallShapes(adapter.attention_layers(transformer))
    with shapes:
        sample(transformer, calls[0])
    shapes.remove()
    image = adapter.image_tokens(transformer, (), inputs, adapter.token_grid(transformer, (), inputs))
    tokens = image or calls_tokens(shapes)
    t_raw = timed(lambda: sample(transformer, calls[1]), cfg, device)

    def zero_forward():
        with ZeroAttention():
            sample(transformer, calls[1])
    share = max(0.0, 1 - timed(zero_forward, cfg, device) / t_raw)
    plan = recipe(cfg, info, adapter.cfg_layout(transformer, (), inputs) is not None, tokens)
    text = calls_tokens(shapes) - tokens  # joint attention's text tokens (0 where text enters by cross-attention)
    attention = AttentionShape(model, tokens, text, info.num_heads, info.head_dim, info.num_layers,
                               batch=calls[0]["hidden_states"].shape[0], bytes_per_value=dtype.itemsize)
    return {"calls": calls, "plan": plan, "attention": attention, "forward_s": t_raw, "attention_share": share,
            "attn_core_flops_fraction": core_fraction(plan, shapes.calls, image, cfg.window_size)}


def ring_report(traffic: RingTraffic, degrees, attention: AttentionShape, window_size: float) -> dict:
    """Every rank's counted ring steps and bytes per window call, next to the communication model's."""
    ranks = distributed.all_gather(traffic.summary())
    shape = AttentionShape(attention.name, attention.image_tokens, attention.text_tokens,
                           attention.heads // degrees.ulysses, attention.head_dim, attention.layers, attention.batch,
                           attention.bytes_per_value)  # the ring exchanges a Ulysses rank's share of the heads
    model = band_steps(shape, degrees.ring, window_size)
    rows = []
    for rank, counted in enumerate(ranks):
        ring_rank = rank % degrees.degree // degrees.ulysses  # diffusers lays the ranks out ring-major
        steps = model[ring_rank]
        rows.append({"rank": rank, "ring_rank": ring_rank, **counted, "model_steps": steps,
                     "model_sent_bytes": (steps - 1) * 2 * shard_bytes(shape, degrees.ring, shape.image_tokens),
                     "model_band_bytes_per_layer": band_ring_bytes(shape, degrees.ring, steps)})
    return {"dense_steps": degrees.ring, "dense_bytes_per_layer": dense_ring_bytes(shape, degrees.ring),
            "steps_match_model": all(r["steps_max"] == r["model_steps"] for r in rows if r["window_calls"]),
            "ranks": rows}


def outputs(transformer, calls: list[dict]) -> list[torch.Tensor]:
    return [sample(transformer, call) for call in calls]


def on_split(model: str, degrees, base: dict, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """One split: raw and the recipe plan timed, all-full checked against raw, the ring counted."""
    groups = context_groups(degrees)
    transformer, _ = build(model, cfg.size, device, dtype)  # the same weights and inputs as the baseline's
    groups.split(transformer)
    calls, plan = base["calls"], base["plan"]
    t_step = timed(lambda: sample(transformer, calls[1]), cfg, device)
    t_loop = timed(lambda: outputs(transformer, calls), cfg, device, loop=True)
    raw = outputs(transformer, calls)
    apply_fastattn(transformer, CompressionPlan.all_full(plan.num_steps, plan.num_layers))
    full = outputs(transformer, calls)
    remove_fastattn(transformer)
    handle = apply_fastattn(transformer, plan, cache_dtype=cfg.cache_dtype)
    try:
        t_plan = timed(lambda: outputs(transformer, calls), cfg, device, loop=True, before=handle.reset)
        handle.reset()
        with RingTraffic() as traffic:
            compressed = outputs(transformer, calls)
    finally:
        remove_fastattn(transformer)
    ideal = 1 / (1 - base["attention_share"] + base["attention_share"] * base["attn_core_flops_fraction"])
    one_gpu_loop = cfg.steps * base["forward_s"]
    row = {"ulysses": degrees.ulysses, "ring": degrees.ring, "degree": degrees.degree, "forward_s": t_step,
           "loop_raw_s": t_loop, "loop_plan_s": t_plan, "speedup": t_loop / t_plan, "ideal_speedup": ideal,
           "of_ideal": t_loop / t_plan / ideal, "raw_over_one_gpu": one_gpu_loop / t_loop,
           "speedup_over_one_gpu": one_gpu_loop / t_plan,
           "of_ideal_over_one_gpu": one_gpu_loop / t_plan / (degrees.degree * ideal),
           "all_full_equal": all(torch.equal(a, b) for a, b in zip(full, raw, strict=True)),
           "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(compressed, raw, strict=True)),
           "relative_diff": max(float((a - b).float().norm() / b.float().norm()) for a, b in zip(compressed, raw))}
    if degrees.ring > 1:
        row["ring_traffic"] = ring_report(traffic, degrees, base["attention"], cfg.window_size)
    return row


def free(device: torch.device) -> None:
    gc.collect()  # the split model's hooks hold cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(model: str, splits, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    base = one_gpu(model, cfg, device, dtype)
    free(device)
    rows = []
    for degrees in splits:
        rows.append(on_split(model, degrees, base, cfg, device, dtype))
        free(device)
    plan = base["plan"]
    return {"model": model, "size": cfg.size, "tokens": base["attention"].tokens,
            "text_tokens": base["attention"].text_tokens, "steps": cfg.steps, "one_gpu_forward_s": base["forward_s"],
            "attention_share": base["attention_share"], "attn_core_flops_fraction": base["attn_core_flops_fraction"],
            "plan": {"counts": plan.counts(), "search": plan.search}, "splits": rows}


def table(results: list[dict]) -> str:
    lines = ["| model | split | raw s/step | raw loop s | fastattn loop s | speed-up | ideal | of ideal | "
             "raw / 1 GPU | fastattn / 1 GPU | all-full = raw | max diff | ring steps taken / dense | "
             "band MB sent / call |", "|" + " --- |" * 14]
    for r in results:
        for s in r["splits"]:
            ring = s.get("ring_traffic")
            steps = (f"{max(x['steps_max'] for x in ring['ranks'])} / {ring['dense_steps']}" if ring else "-")
            sent = f"{max(x['sent_bytes_per_window_call'] for x in ring['ranks']) / 1e6:.1f}" if ring else "-"
            lines.append(f"| {r['model']} | U{s['ulysses']} x R{s['ring']} | {s['forward_s']:.3f} | "
                         f"{s['loop_raw_s']:.3f} | {s['loop_plan_s']:.3f} | {s['speedup']:.2f}x | "
                         f"{s['ideal_speedup']:.2f}x | {s['of_ideal']:.0%} | {s['raw_over_one_gpu']:.2f}x | "
                         f"{s['speedup_over_one_gpu']:.2f}x | {s['all_full_equal']} | {s['max_abs_diff']:.3g} | "
                         f"{steps} | {sent} |")
    return "\n".join(lines) + "\n"


def check_config(cfg: DictConfig, world: int) -> list:
    """One-line errors before any model is built or any process group joined; the splits."""
    check_run_settings(cfg, JSON, MODELS, "size")
    try:
        parse_cache_options(cfg.cache_dtype, None, False)
    except ValueError as error:
        raise ConfigError(f"cache_dtype: {error}") from None
    check_device(cfg)
    splits = read_splits(OmegaConf.to_container(cfg.splits) if cfg.splits is not None else None, world)
    check_splits(splits, world, cfg.models, cfg.size)
    if resolve_device(cfg.device).type != "cuda" and cfg.size != "tiny":
        raise ConfigError(f"benchmark_context times full-size models on GPUs and torch sees none (device={cfg.device}); "
                          "on a CPU give size=tiny device=cpu")
    return splits


def benchmark_context(cfg: DictConfig) -> list[dict]:
    world = distributed.world_from_env()
    splits = check_config(cfg, world.size)
    use_fa4(cfg)
    with distributed.joined(world):
        device = distributed.local_device(resolve_device(cfg.device))
        dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "ranks": world.size, "torch": torch.__version__, "dtype": str(dtype),
                "config": OmegaConf.to_container(cfg, resolve=True)}
        results = []
        for model in cfg.models:  # a rank that fails stops torchrun's whole job: no catching here
            with prefer_fast_dense():  # the one-GPU baseline and fastattn's own calls on one dense kernel
                results.append(benchmark(model, splits, cfg, device, dtype))
            if distributed.is_main():  # every model's numbers kept as soon as they exist
                atomic_write_json(Path(cfg.out) / JSON, {"meta": meta, "results": results})
                atomic_write_bytes(Path(cfg.out) / "benchmark_context.md", table(results).encode())
        if distributed.is_main():
            print(table(results), end="")
    return results


main = hydra_app("benchmark_context", benchmark_context)

if __name__ == "__main__":
    main()
