"""Step speed-ups of models served through the generic adapter, at full size on random weights.

    python -m experiments.benchmark_zoo out=outputs/bench_zoo                                  # GPU
    python -m experiments.benchmark_zoo models=[qwen_image] out=outputs/bench_zoo             # one model
    python -m experiments.benchmark_zoo size=tiny device=cpu out=/tmp/z                       # CPU smoke run

HunyuanVideo (720p x 129 frames), CogVideoX-5B (480 x 720 x 49) and Qwen-Image (2048²)
(:mod:`.bench.zoo_shapes`), raw and under a recipe plan (:func:`fastattn.search.recipe.plan_at_fraction`
at ``target``; methods sharing across CFG left full where the pipeline has no CFG batch), both
on the same dense kernel (FlashAttention-4 where it runs, :func:`fastattn.kernels.prefer_fast_dense`).
Measured in one run per model:

- a, the attention share: (t_raw - t_core) / t_raw, t_core the forward with every attention
  call answered by zeros (the projections, norms and the rest of the model still run);
- f, the plan's attention-core FLOPs fraction over the loop, counted from the calls the layers
  make (each call's query and key tokens; its window the band over an image-only sequence, the
  arrow over the image tokens where text joins it, whole where it holds no image query);
- the speed-up of a ``steps``-call loop against the raw loop (``steps`` raw calls: nothing is
  carried between them, so each costs the median raw forward), the ideal 1 / ((1 - a) + a f) and
  their ratio; for the ``recipe`` plan and the ``window`` plan (step 0 full, then WA-RS on every
  layer: the window kernels alone, nothing skipped). ``cache_dtype`` keeps the caches in FP8
  where they would not fit (HunyuanVideo at 720p: 60 layers of 118,800-token outputs and residuals).
"""

from __future__ import annotations


import torch
from omegaconf import DictConfig
from torch.overrides import TorchFunctionMode

from fastattn import Method, apply_fastattn, describe, remove_fastattn
from fastattn.cache_store import parse_cache_options
from fastattn.core_call import SDPA, sdpa_arguments
from fastattn.kernels.arrow import arrow_pairs
from fastattn.kernels.masks import band_pairs, window_half_width
from fastattn.layerwise.plan import LayerPlan
from fastattn.models import get_adapter
from fastattn.search.recipe import plan_at_fraction

from .bench.per_model import check_run_settings, run_models
from .bench.zoo_shapes import MODELS, NO_CFG, build, step_inputs, zoo_shape
from .infra.app import ConfigError, hydra_app
from .infra.config import check_device
from .infra.timing import time_ms


class CallShapes(TorchFunctionMode):
    """Each attention layer's calls, (query tokens, key tokens), in one forward."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.calls: list[list[tuple[int, int]]] = [[] for _ in layers]
        self.current: int | None = None
        self.hooks = [h for i, layer in enumerate(layers) for h in (
            layer.register_forward_pre_hook(lambda *_, i=i: setattr(self, "current", i)),
            layer.register_forward_hook(lambda *_: setattr(self, "current", None)))]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and self.current is not None:
            named = sdpa_arguments(args, kwargs)
            self.calls[self.current].append((named["query"].shape[-2], named["key"].shape[-2]))
        return func(*args, **kwargs)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class ZeroAttention(TorchFunctionMode):
    """Every attention call answered by zeros: what the rest of the model costs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            named = sdpa_arguments(args, kwargs)
            return named["query"].new_zeros(*named["query"].shape[:-1], named["value"].shape[-1])
        return func(*args, **kwargs)


def window_pairs(q_len: int, k_len: int, image: int | None, window_size: float) -> int:
    """(query, key) pairs one call's window computes (the layer-wise processor's rules)."""
    if image is None or q_len == k_len == image:
        return band_pairs(q_len, window_half_width(q_len, window_size)) if q_len == k_len else q_len * k_len
    half = window_half_width(image, window_size)
    if q_len == k_len and q_len > image:  # text joined in: the arrow
        return arrow_pairs(image, q_len - image, half)
    if q_len == image and k_len > q_len:  # image queries over text (or prefix) and image keys
        text = k_len - image
        return arrow_pairs(image, text, half) - text * k_len
    return q_len * k_len  # no image queries: kept whole


def core_fraction(plan, calls: list[list[tuple[int, int]]], image: int | None, window_size: float) -> float:
    """The plan's attention-core FLOPs over its steps against the raw model's."""
    refresh = plan.refresh_mask()
    full = [sum(q * k for q, k in layer) for layer in calls]
    window = [sum(window_pairs(q, k, image, window_size) for q, k in layer) for layer in calls]
    spent = 0.0
    for s, row in enumerate(plan.methods):
        for l, method in enumerate(row):
            cost = {Method.FULL: full[l] + (window[l] if refresh[s][l] else 0), Method.WARS: window[l],
                    Method.WA: window[l], Method.ASC: full[l] / 2, Method.WARS_ASC: window[l] / 2}.get(method, 0.0)
            spent += cost
    return spent / (len(plan.methods) * sum(full))


def benchmark(model: str, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    transformer, inputs = build(model, cfg.size, device, dtype)
    info = describe(transformer)
    adapter = get_adapter(transformer)
    layers = adapter.attention_layers(transformer)
    calls = [step_inputs(inputs, info.timestep_arg, s, cfg.steps) for s in range(cfg.steps)]

    def forward(call):
        with torch.no_grad():
            return transformer(**call)

    def loop():
        for call in calls:
            forward(call)

    shapes = CallShapes(layers)
    with shapes:
        forward(calls[0])  # also the raw model's warm-up
    shapes.remove()
    image = adapter.image_tokens(transformer, (), inputs, adapter.token_grid(transformer, (), inputs))
    t_raw = time_ms(lambda: forward(calls[1]), device, cfg.warmup, cfg.repeats, clock="wall") / 1e3

    def zero_forward():
        with ZeroAttention():
            forward(calls[1])
    t_core = time_ms(zero_forward, device, cfg.warmup, cfg.repeats, clock="wall") / 1e3
    share = max(0.0, (t_raw - t_core) / t_raw)
    loop_raw = cfg.steps * t_raw  # the raw model's calls all cost the same (nothing carried between them)

    rows = []
    cfg_batch = adapter.cfg_layout(transformer, (), inputs) is not None
    for name in cfg.plans:
        plan = PLANS[name](cfg, info, cfg_batch, image or calls_tokens(shapes))
        fraction = core_fraction(plan, shapes.calls, image, cfg.window_size)
        handle = apply_fastattn(transformer, plan, cache_dtype=cfg.cache_dtype)
        try:
            loop_plan = time_ms(lambda: (handle.reset(), loop()), device, cfg.loop_warmup, cfg.loop_repeats,
                                clock="wall") / 1e3
        finally:
            remove_fastattn(transformer)
        ideal = 1 / (1 - share + share * fraction)
        speedup = loop_raw / loop_plan
        rows.append({"plan": name, "loop_plan_s": loop_plan, "attn_core_flops_fraction": fraction,
                     "speedup": speedup, "ideal_speedup": ideal, "of_ideal": speedup / ideal, "counts": plan.counts(),
                     "search": plan.search})
    return {"model": model, "class": info.class_name, "size": cfg.size, "note": zoo_shape(model, cfg.size).note,
            "layers": info.num_layers, "image_tokens": image, "calls_per_layer": [len(c) for c in shapes.calls],
            "call_tokens": sorted({c for layer in shapes.calls for c in layer}), "forward_s": t_raw,
            "core_zeroed_forward_s": t_core, "attention_share": share, "steps": cfg.steps, "loop_raw_s": loop_raw,
            "cache_dtype": cfg.cache_dtype, "plans": rows}


def calls_tokens(shapes: CallShapes) -> int:
    return max(q for layer in shapes.calls for q, _ in layer)


def recipe(cfg: DictConfig, info, cfg_batch: bool, tokens: int) -> LayerPlan:
    """The recipe plan at ``cfg.target`` (sized from ``describe``); without a CFG batch its
    CFG-sharing methods become their unshared kin."""
    plan = plan_at_fraction(cfg.target, cfg.steps, {"num_layers": info.num_layers, "num_heads": info.num_heads,
                                                    "head_dim": info.head_dim, "seq_len": tokens}, cfg.window_size)
    rows = [[m if cfg_batch else NO_CFG.get(m, m) for m in row] for row in plan.methods]
    return LayerPlan(rows, window_size=cfg.window_size,
                     search={**plan.search, "cfg": "batched" if cfg_batch else "none: asc left full"})


def window_plan(cfg: DictConfig, info, cfg_batch: bool, tokens: int) -> LayerPlan:
    """Step 0 full (it refreshes every residual), then WA-RS on every layer: the window kernels
    through the layers' own processors, with nothing skipped."""
    rows = [[Method.FULL] * info.num_layers] + [[Method.WARS] * info.num_layers] * (cfg.steps - 1)
    return LayerPlan(rows, window_size=cfg.window_size, search={"algorithm": "benchmark_window"})


PLANS = {"recipe": recipe, "window": window_plan}


def print_table(results: list[dict]) -> None:
    print("| model | image tokens | s/forward | attn share | plan | attn core FLOPs | speed-up | ideal | of ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for p in r["plans"]:
            print(f"| {r['model']} | {r['image_tokens']} | {r['forward_s']:.3f} | {r['attention_share']:.2f} | "
                  f"{p['plan']} | {p['attn_core_flops_fraction']:.3f} | {p['speedup']:.2f}x | "
                  f"{p['ideal_speedup']:.2f}x | {p['of_ideal']:.0%} |")


def check_config(cfg: DictConfig) -> None:
    check_run_settings(cfg, "benchmark_zoo.json", MODELS, "size")
    if not cfg.plans or any(p not in PLANS for p in cfg.plans):
        raise ConfigError(f"plans must be a non-empty list of {', '.join(PLANS)}, got {list(cfg.plans)}")
    try:
        parse_cache_options(cfg.cache_dtype, None, False)
    except ValueError as error:
        raise ConfigError(f"cache_dtype: {error}") from None
    check_device(cfg)


def benchmark_zoo(cfg: DictConfig) -> list[dict]:
    check_config(cfg)
    return run_models(cfg, "benchmark_zoo.json", benchmark, print_table)


main = hydra_app("benchmark_zoo", benchmark_zoo)

if __name__ == "__main__":
    main()
