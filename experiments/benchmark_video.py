"""Latency of video DiTs under fastattn: attention share, attention FLOPs fraction, speed-up.

    python -m experiments.benchmark_video --out outputs/bench_video            # GPU, full shapes
    python -m experiments.benchmark_video --shape tiny --device cpu --out /tmp/b  # CPU smoke run

Random weights at the real shapes: Latte-1 (28+28 blocks, 16 heads x 72) at 16 frames of 256²
(16 x 16 tokens per frame, CFG batch of 2 in one call) and Wan 2.1 T2V 1.3B (30 blocks, 12
heads x 128) at 81 frames of 480 x 832 (21 x 30 x 52 = 32,760 tokens; conditional and
unconditional passes as two calls, as WanPipeline runs them).

Measured, per transformer forward (median of repeats, after warm-up):

- ``attention share`` = (t_raw - t_identity) / t_raw, where t_identity is the forward with every
  self-attention module returning its input (no projections, no attention);
- for each plan: its attention FLOPs fraction (each layer in its own geometry,
  :mod:`fastattn.video_flops`), the end-to-end speed-up of a ``--steps`` denoising loop against
  the unmodified model, the ideal speed-up 1 / (1 - share + share · fraction), and the ratio.

Plans: ``recipe`` (deterministic, below) at ``--target`` FLOPs fraction, plus any ``--plan`` JSON
whose layer count matches. Recipe: step 0 full; step s > 0 is a refresh step (all full) when
s % r == 0, otherwise layer l runs ``ast`` when s + l is even and ``wars`` when odd (``wars+asc``
for a model with a CFG batch, Latte); r is the refresh period in 2..steps whose FLOPs fraction
is closest to the target (ties: larger r).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from fastattn.kernels import dense_mask, prefer_fast_dense, set_fa4
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention, tile_block_mask, tile_neighbourhood_mask_mod, tile_pairs, tile_shape,
)
from fastattn.models import get_adapter
from fastattn.models.video import layer_kinds
from fastattn.utils.io import atomic_write_json
from fastattn.video_flops import VideoShape, video_attention_flops

from .bench.timing import time_graphed_ms

# name -> (transformer config, latent [channels, frames, height, width], text tokens, calls per step)
SHAPES = {
    ("latte", "full"): (dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                             num_layers=28, sample_size=32, patch_size=2, cross_attention_dim=1152,
                             caption_channels=4096, video_length=16, norm_type="ada_norm_single",
                             num_embeds_ada_norm=1000, activation_fn="gelu-approximate"), (4, 16, 32, 32), 120, 1),
    ("wan", "full"): (dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                           out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
                      (16, 21, 60, 104), 512, 2),
    ("latte", "tiny"): (dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                             num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
                             video_length=4, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                             activation_fn="gelu-approximate"), (4, 4, 8, 8), 6, 1),
    ("wan", "tiny"): (dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                           out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
                      (4, 3, 8, 8), 6, 2),
}


class IdentityAttention:
    """Stands in for a self-attention processor: the module returns its input unchanged."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def build(model: str, shape: str, device: torch.device, dtype: torch.dtype):
    from diffusers import LatteTransformer3DModel, WanTransformer3DModel

    config, latent, text_len, calls = SHAPES[(model, shape)]
    torch.manual_seed(0)
    cls = LatteTransformer3DModel if model == "latte" else WanTransformer3DModel
    with torch.device(device):
        transformer = cls(**config).eval()
    keep_fp32 = getattr(cls, "_keep_in_fp32_modules", None) or []  # as from_pretrained(torch_dtype=...) keeps them
    for name, param in transformer.named_parameters():
        if dtype != torch.float32 and not any(k in name.split(".") for k in keep_fp32):
            param.data = param.data.to(dtype)
    batch = 2 if calls == 1 else 1  # Latte: CFG batch in one call; Wan: one call per pass
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, *latent, generator=g).to(device, dtype)
    text_dim = config.get("caption_channels", config.get("text_dim"))
    texts = [torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype) for _ in range(calls)]
    patch = config["patch_size"]
    p_t, p_h, p_w = patch if isinstance(patch, tuple) else (1, patch, patch)
    c, f, h, w = latent
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    video = VideoShape(f // p_t, h // p_h, w // p_w, heads, head_dim, heads * head_dim)
    return transformer, x, texts, video


@torch.no_grad()
def run_steps(transformer, x, texts, steps: int) -> None:
    """One denoising loop's transformer calls; distinct timesteps so each step is counted once."""
    for t in torch.linspace(999, 1, steps):
        for text in texts:
            transformer(x, timestep=t.expand(x.shape[0]).to(x.device), encoder_hidden_states=text, return_dict=False)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recipe_plan(steps: int, layers: int, refresh_every: int, window_fraction: float,
                window_method: Method = Method.WARS) -> CompressionPlan:
    rows = []
    for s in range(steps):
        if s == 0 or s % refresh_every == 0:
            rows.append([Method.FULL] * layers)
        else:
            rows.append([Method.AST if (s + l) % 2 == 0 else window_method for l in range(layers)])
    return CompressionPlan(rows, window_fraction=window_fraction,
                           search={"algorithm": "benchmark_recipe", "refresh_every": refresh_every})


def pick_recipe(steps, kinds, video, target, window_fraction, window_method=Method.WARS) -> CompressionPlan:
    best = None
    for r in range(2, steps + 1):
        plan = recipe_plan(steps, len(kinds), r, window_fraction, window_method)
        gap = abs(video_attention_flops(plan, kinds, video)["fraction"] - target)
        if best is None or gap <= best[0]:
            best = (gap, plan)
    return best[1]


def forward_timer(transformer, x, texts, args, device: torch.device):
    """Seconds per transformer forward: wall clock around eager calls, or with ``--cuda-graphs``
    the replay of one captured forward (GPU time, no launch overhead)."""
    if not args.cuda_graphs:
        return lambda: timed(lambda: run_steps(transformer, x, texts[:1], 1), device, args.warmup, args.repeats)
    t = torch.full((x.shape[0],), 500.0, device=device)

    def graphed():
        with torch.no_grad():
            ms = time_graphed_ms(lambda: transformer(x, timestep=t, encoder_hidden_states=texts[0], return_dict=False),
                                 device, args.warmup, args.repeats, calls=1)
        if ms is None:
            raise RuntimeError("--cuda-graphs: one forward of the model could not be captured in a CUDA graph")
        return ms / 1e3

    return graphed


def benchmark(model: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    transformer, x, texts, video = build(model, args.shape, device, dtype)
    kinds = layer_kinds(transformer)
    time_forward = forward_timer(transformer, x, texts, args, device)
    t_raw = time_forward()
    layers = get_adapter(transformer).attention_layers(transformer)
    originals = [a.processor for a in layers]
    for a in layers:
        a.set_processor(IdentityAttention())
    t_identity = time_forward()
    for a, p in zip(layers, originals):
        a.set_processor(p)
    share = max(0.0, (t_raw - t_identity) / t_raw)

    loop = lambda: run_steps(transformer, x, texts, args.steps)  # noqa: E731
    window_method = Method.WARS_ASC if len(texts) == 1 else Method.WARS  # ASC needs the CFG batch
    plans = {"recipe": pick_recipe(args.steps, kinds, video, args.target, args.window_fraction, window_method)}
    for path in args.plan:
        loaded = CompressionPlan.load(path)
        if loaded.num_layers == len(kinds) and loaded.num_steps == args.steps:
            plans[Path(path).stem] = loaded
        else:
            print(f"skipping {path} for {model}: {loaded.num_steps}x{loaded.num_layers}, need {args.steps}x{len(kinds)}")

    def time_loop(plan: CompressionPlan | None, label: str) -> float:
        # With --cuda-graphs the raw model runs as an all-full plan, so both sides replay graphs.
        if plan is None and args.cuda_graphs:
            plan = CompressionPlan.all_full(args.steps, len(kinds))
        handle = apply_fastattn(transformer, plan, cuda_graphs=args.cuda_graphs) if plan is not None else None

        def run():
            if handle is not None:
                handle.reset()
            loop()

        try:
            seconds = timed(run, device, args.loop_warmup, args.loop_repeats)
            if args.profile:
                profile(run, device, Path(args.out) / f"profile_{model}_{label}.txt")
        finally:
            if handle is not None:
                remove_fastattn(transformer)
        return seconds

    t_loop_raw = time_loop(None, "raw")
    rows = []
    for name, plan in plans.items():
        flops = video_attention_flops(plan, kinds, video)
        t_loop = time_loop(plan, name)
        ideal = 1 / (1 - share + share * flops["fraction"])
        speedup = t_loop_raw / t_loop
        rows.append({"plan": name, "attn_flops_fraction": flops["fraction"], "core_fraction": flops["core_fraction"],
                     "loop_s": t_loop, "speedup": speedup, "ideal_speedup": ideal, "of_ideal": speedup / ideal,
                     "counts": plan.counts(), "search": plan.search})
    return {"model": model, "shape": args.shape, "tokens": video.tokens, **window_density(kinds, video, args, device),
            "grid": [video.frames, video.rows, video.cols], "calls_per_step": len(texts), "steps": args.steps,
            "cuda_graphs": args.cuda_graphs, "forward_ms": 1e3 * t_raw, "identity_forward_ms": 1e3 * t_identity,
            "attention_share": share, "loop_raw_s": t_loop_raw, "plans": rows}


def profile(run, device: torch.device, path: Path) -> None:
    """Kernel-level time table of one ``run()`` (torch.profiler), for finding where time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)


def window_density(kinds, video: VideoShape, args, device: torch.device) -> dict:
    """For full 3-D attention: the tile window's share of (query, key) pairs, and on CUDA the share
    of FlexAttention blocks it executes (what the kernel pays; blocks straddle tiles)."""
    if "full3d" not in kinds:
        return {}
    grid = (video.frames, video.rows, video.cols)
    tile = tile_shape(grid, args.window_fraction)
    out = {"tile": list(tile), "window_pair_density": tile_pairs(grid, tile) / video.tokens**2}
    if device.type == "cuda":
        out["window_block_density"] = 1 - tile_block_mask(grid, tile, 1, device).sparsity() / 100
        out["window_kernel_max_abs_error"] = check_tile_kernel(device)
    return out


def check_tile_kernel(device: torch.device) -> float:
    """The CUDA tile window (block-sparse, tile-major) against the masked definition, float32."""
    grid, fraction = (5, 6, 9), 0.3
    tile = tile_shape(grid, fraction)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (t.to(device) for t in torch.randn(3, 2, 2, 270, 64, generator=g).unbind(0))
    mask = dense_mask(tile_neighbourhood_mask_mod(grid, tile), 270, 270, device=device)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return float((sparse_tile_window_attention(q, k, v, grid, tile) - reference).abs().max())


def print_table(results: list[dict]) -> None:
    print("| model | tokens | ms/forward | outside attn ms | attn share | plan | attn FLOPs | speed-up | ideal | of ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for p in r["plans"]:
            print(f"| {r['model']} | {r['tokens']} | {r['forward_ms']:.1f} | {r['identity_forward_ms']:.1f} | "
                  f"{r['attention_share']:.2f} | {p['plan']} | {p['attn_flops_fraction']:.3f} | {p['speedup']:.2f}x | "
                  f"{p['ideal_speedup']:.2f}x | {p['of_ideal']:.0%} |")
        if "window_pair_density" in r:
            print(f"{r['model']}: tile {r['tile']}, window pairs {r['window_pair_density']:.3f} of dense, "
                  f"executed blocks {r.get('window_block_density', float('nan')):.3f}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["wan", "latte"], choices=["wan", "latte"])
    ap.add_argument("--shape", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.3, help="attention FLOPs fraction of the recipe plan")
    ap.add_argument("--window-fraction", type=float, default=0.125)
    ap.add_argument("--plan", nargs="*", default=[], help="extra plan JSON files to time")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-warmup", type=int, default=1)
    ap.add_argument("--loop-repeats", type=int, default=2)
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay each step layout from a CUDA graph (raw as an all-full plan, too)")
    ap.add_argument("--profile", action="store_true", help="write a kernel time table per loop to --out")
    ap.add_argument("--out", required=True, help="directory for benchmark_video.json")
    ap.add_argument("--fa4", default="auto", choices=["auto", "on", "off"],
                    help="FlashAttention-4 for raw and compressed alike (auto: SM90/SM100 when it imports)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps must be >= 2, got {args.steps}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        ap.error("--cuda-graphs needs --device cuda")
    if not 0 < args.target <= 1:
        ap.error(f"--target must be in (0, 1], got {args.target}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    set_fa4(args.fa4)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "args": vars(args)}
    results, errors = [], {}
    for m in args.models:  # one model failing still leaves the others' numbers on disk
        try:
            with prefer_fast_dense():  # raw and compressed on the same dense kernel
                results.append(benchmark(m, args, device, dtype))
        except Exception as e:  # noqa: BLE001  (reported, then re-raised at the end)
            errors[m] = f"{type(e).__name__}: {e}"
            print(f"{m} failed: {errors[m]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        atomic_write_json(Path(args.out) / "benchmark_video.json", {"meta": meta, "results": results, "errors": errors})
    print_table(results)
    if errors:
        raise RuntimeError(f"benchmark failed for {', '.join(errors)}; see {args.out}/benchmark_video.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
