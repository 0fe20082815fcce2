"""Latency of video DiTs under fastattn: attention share, attention FLOPs fraction, speed-up.

    python -m experiments.benchmark_video out=outputs/bench_video              # GPU, full shapes
    python -m experiments.benchmark_video shape=tiny device=cpu out=/tmp/b     # CPU smoke run

Random weights at the real shapes: Latte-1 (28+28 blocks, 16 heads x 72) at 16 frames of 256²
(16 x 16 tokens per frame, CFG batch of 2 in one call) and Wan 2.1 T2V 1.3B (30 blocks, 12
heads x 128) at 81 frames of 480 x 832 (21 x 30 x 52 = 32,760 tokens; conditional and
unconditional passes as two calls, as WanPipeline runs them).

Measured, per transformer forward (median of repeats, after warm-up):

- ``attention share`` = (t_raw - t_identity) / t_raw, where t_identity is the forward with every
  self-attention module returning its input (no projections, no attention);
- for each plan: its attention FLOPs fraction (each layer in its own geometry,
  :mod:`fastattn.layerwise.video_flops`), the end-to-end speed-up of a ``steps`` denoising loop against
  the unmodified model, the ideal speed-up 1 / (1 - share + share · fraction), and the ratio.

Plans: ``recipe`` (deterministic, below) at ``target`` FLOPs fraction with the 1-D band window,
``recipe_tile`` the same with the 3-D tile window (full 3-D attention only; ``window_shapes``),
plus any ``plan`` JSON whose layer count matches. Recipe: step 0 full; step s > 0 is a refresh step (all full) when
s % r == 0, otherwise layer l runs ``ast`` when s + l is even and ``wars`` when odd (``wars+asc``
for a model with a CFG batch, Latte); r is the refresh period in 2..steps whose FLOPs fraction
is closest to the target (ties: larger r).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fastattn import CompressionPlan, Method, apply_fastattn, remove_fastattn
from fastattn.kernels import dense_mask
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention, tile_block_mask, tile_neighbourhood_mask_mod, tile_pairs, tile_shape,
)
from fastattn.layerwise.plan import WINDOW_SHAPES
from fastattn.layerwise.video_flops import VideoShape, video_attention_flops
from fastattn.models import get_adapter
from fastattn.models import layer_kinds
from fastattn.utils.paths import path_inside, slug

from .bench.per_model import check_run_settings, run_models
from .bench.probes import block_density
from .infra.app import ConfigError, hydra_app
from .infra.config import check_bool, check_device
from .infra.timing import time_graphed_ms, time_ms

MODELS = ("wan", "latte")
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
    x = torch.randn(1, *latent, generator=g).to(device, dtype).repeat(batch, *[1] * len(latent))  # CFG: same latents
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
    """Median seconds of ``fn()`` on the synchronised wall clock."""
    return time_ms(fn, device, warmup, repeats, clock="wall") / 1e3


def recipe_plan(steps: int, layers: int, refresh_every: int, window_size: float,
                window_method: Method = Method.WARS, window_shape: str = "band") -> CompressionPlan:
    rows = []
    for s in range(steps):
        if s == 0 or s % refresh_every == 0:
            rows.append([Method.FULL] * layers)
        else:
            rows.append([Method.AST if (s + l) % 2 == 0 else window_method for l in range(layers)])
    return CompressionPlan(rows, window_size=window_size, window_shape=window_shape,
                           search={"algorithm": "benchmark_recipe", "refresh_every": refresh_every})


def pick_recipe(steps, kinds, video, target, window_size, window_method=Method.WARS,
                window_shape: str = "band") -> CompressionPlan:
    best = None
    for r in range(2, steps + 1):
        plan = recipe_plan(steps, len(kinds), r, window_size, window_method, window_shape)
        gap = abs(video_attention_flops(plan, kinds, video)["fraction"] - target)
        if best is None or gap <= best[0]:
            best = (gap, plan)
    return best[1]


def forward_timer(transformer, x, texts, cfg, device: torch.device):
    """Seconds per transformer forward: wall clock around eager calls, or with ``cuda_graphs=true``
    the replay of one captured forward (GPU time, no launch overhead)."""
    if not cfg.cuda_graphs:
        return lambda: timed(lambda: run_steps(transformer, x, texts[:1], 1), device, cfg.warmup, cfg.repeats)
    t = torch.full((x.shape[0],), 500.0, device=device)

    def graphed():
        with torch.no_grad():
            ms = time_graphed_ms(lambda: transformer(x, timestep=t, encoder_hidden_states=texts[0], return_dict=False),
                                 device, cfg.warmup, cfg.repeats, calls=1)
        if ms is None:
            raise RuntimeError("cuda_graphs=true: one forward of the model could not be captured in a CUDA graph")
        return ms / 1e3

    return graphed


def benchmark(model: str, cfg, device: torch.device, dtype: torch.dtype) -> dict:
    transformer, x, texts, video = build(model, cfg.shape, device, dtype)
    kinds = layer_kinds(transformer)
    time_forward = forward_timer(transformer, x, texts, cfg, device)
    t_raw = time_forward()
    t_identity = identity_forward(transformer, time_forward)
    share = max(0.0, (t_raw - t_identity) / t_raw)
    plans = plans_to_time(model, cfg, kinds, video, len(texts))
    time_loop = loop_timer(model, transformer, x, texts, cfg, device, len(kinds))
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
    return {"model": model, "shape": cfg.shape, "tokens": video.tokens, **window_density(kinds, video, cfg, device),
            "grid": [video.frames, video.rows, video.cols], "calls_per_step": len(texts), "steps": cfg.steps,
            "cuda_graphs": cfg.cuda_graphs, "forward_ms": 1e3 * t_raw, "identity_forward_ms": 1e3 * t_identity,
            "attention_share": share, "loop_raw_s": t_loop_raw, "plans": rows}


def identity_forward(transformer, time_forward) -> float:
    """Seconds of one forward with every attention layer an identity (what the rest of the model
    costs); the layers get their own processors back after."""
    layers = get_adapter(transformer).attention_layers(transformer)
    originals = [a.processor for a in layers]
    for a in layers:
        a.set_processor(IdentityAttention())
    t_identity = time_forward()
    for a, p in zip(layers, originals):
        a.set_processor(p)
    return t_identity


def plans_to_time(model: str, cfg, kinds, video: VideoShape, calls_per_step: int) -> dict[str, CompressionPlan]:
    """The recipe plan of each window shape the model has, then the ``cfg.plan`` files that fit it."""
    window_method = Method.WARS_ASC if calls_per_step == 1 else Method.WARS  # ASC needs the CFG batch
    # The 3-D tile is a window of full 3-D attention only; spatial/temporal layers use the band.
    shapes = [w for w in cfg.window_shapes if w == "band" or "full3d" in kinds]
    plans = {("recipe" if w == "band" else f"recipe_{w}"):
             pick_recipe(cfg.steps, kinds, video, cfg.target, cfg.window_size, window_method, w) for w in shapes}
    for path in cfg.plan:
        loaded = CompressionPlan.load(path)
        if loaded.num_layers == len(kinds) and loaded.num_steps == cfg.steps:
            plans[Path(path).stem] = loaded
        else:
            print(f"skipping {path} for {model}: {loaded.num_steps}x{loaded.num_layers}, need {cfg.steps}x{len(kinds)}")
    return plans


def loop_timer(model: str, transformer, x, texts, cfg, device: torch.device, num_layers: int):
    """``time_loop(plan, label)``: seconds of one ``cfg.steps``-step denoising loop under ``plan``
    (None: the raw model), with a kernel table per label when ``cfg.profile``."""
    def time_loop(plan: CompressionPlan | None, label: str) -> float:
        # With cuda_graphs=true the raw model runs as an all-full plan, so both sides replay graphs.
        if plan is None and cfg.cuda_graphs:
            plan = CompressionPlan.all_full(cfg.steps, num_layers)
        handle = apply_fastattn(transformer, plan, cuda_graphs=cfg.cuda_graphs) if plan is not None else None

        def run():
            if handle is not None:
                handle.reset()
            run_steps(transformer, x, texts, cfg.steps)

        try:
            seconds = timed(run, device, cfg.loop_warmup, cfg.loop_repeats)
            if cfg.profile:
                profile(run, device, path_inside(cfg.out, slug(f"profile_{model}_{label}") + ".txt"))
        finally:
            if handle is not None:
                remove_fastattn(transformer)
        return seconds

    return time_loop


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


def window_density(kinds, video: VideoShape, cfg, device: torch.device) -> dict:
    """For full 3-D attention: the tile window's share of (query, key) pairs, and on CUDA the share
    of FlexAttention blocks it executes (what the kernel pays; blocks straddle tiles)."""
    if "full3d" not in kinds:
        return {}
    grid = (video.frames, video.rows, video.cols)
    tile = tile_shape(grid, cfg.window_size)
    out = {"tile": list(tile), "window_pair_density": tile_pairs(grid, tile) / video.tokens**2}
    if device.type == "cuda":
        out["window_block_density"] = block_density(tile_block_mask(grid, tile, 1, device))
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


def check_config(cfg: DictConfig) -> None:
    check_run_settings(cfg, "benchmark_video.json", MODELS, "shape")
    if not cfg.window_shapes or any(w not in WINDOW_SHAPES for w in cfg.window_shapes):
        raise ConfigError(f"window_shapes must be a non-empty list of {', '.join(WINDOW_SHAPES)}, "
                          f"got {list(cfg.window_shapes)}")
    for key in ("cuda_graphs", "profile"):
        check_bool(cfg, key)
    check_device(cfg, needs_cuda="cuda_graphs=true" if cfg.cuda_graphs else None)
    missing = [path for path in cfg.plan if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"plan: file not found: {missing[0]}")


def benchmark_video(cfg: DictConfig) -> list[dict]:
    check_config(cfg)
    return run_models(cfg, "benchmark_video.json", benchmark, print_table)


main = hydra_app("benchmark_video", benchmark_video)

if __name__ == "__main__":
    main()
