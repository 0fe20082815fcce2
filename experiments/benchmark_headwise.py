"""Benchmarks of DiTFastAttnV2's head-wise attention on full-size SD3 / FLUX with random weights.

Writes ``benchmark_headwise.json`` (every measurement, device and versions) and
``latency_table.json`` (per-head latency of each method relative to full, which
``search_headwise_plan(latency=...)`` reads) into the output directory and prints a table.

- kernel: one layer's attention, dense SDPA against the head-wise call at 25/50/75% head
  sparsity, with the skipped heads cached, arrow (narrowest window) or half and half.
- step: one transformer call raw, with every head cached (no attention core: the attention
  share ``a`` of a step), and with synthetic plans at the given attention sparsities ``s``; the
  speed-up against the ideal 1 / ((1 - a) + a (1 - s)).
- search: ``search_steps`` transformer calls under the head-wise search against raw calls.

    python -m experiments.benchmark_headwise arch=flux_dev resolution=2048 batch=1
"""

from __future__ import annotations

import math
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import fastattn.kernels.arrow as arrow_kernels
from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from fastattn.headwise.latency import ARROW_FRACTION_KEY
from fastattn.headwise.methods import CACHE, CFG, FULL, HeadMethod, arrow
from fastattn.headwise.processor import arrow_residuals, headwise_attention
from fastattn.kernels import prefer_fast_dense
from fastattn.utils.io import atomic_write_json

from .bench.end_to_end import COMPILE_MODES, compiled, share_from_loops
from .bench.head_rows import layer_sparsity, synthetic_row
from .infra.app import ConfigError, hydra_app, resolve_device
from .infra.config import DTYPES, check_choice, check_device, check_fractions, use_fa4
from .infra.timing import time_graphed_ms, time_ms
from .models.architectures import ARCHITECTURES, build_random_transformer, image_tokens, random_transformer_inputs
from .models.loaders import parse_dtype


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              before: Callable[[], object] | None = None) -> float:
    """Median seconds of ``fn()`` on the synchronised wall clock; ``before()`` runs untimed ahead of each call."""
    return time_ms(fn, device, warmup, repeats, clock="wall", before=before) / 1e3


def skipped_methods(heads: int, sparsity: float, mode: str, window: float) -> list[HeadMethod]:
    """A layer's head methods with round(sparsity * heads) heads not computed in full."""
    n = round(sparsity * heads)
    if mode == "cache":
        skipped = [CACHE] * n
    elif mode == "arrow":
        skipped = [arrow(window)] * n
    else:
        skipped = [CACHE if i % 2 == 0 else arrow(window) for i in range(n)]
    return skipped + [FULL] * (heads - n)


def kernel_benchmark(cfg, device, dtype, heads, head_dim, image_len, text_len) -> dict:
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shape = (cfg.batch, heads, image_len + text_len, head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    previous = torch.randn(*shape, generator=g).to(device, dtype)
    start = 0 if ARCHITECTURES[cfg.arch]["cls"] == "SD3Transformer2DModel" else text_len
    timed = lambda fn: time_call(fn, device, cfg.warmup, cfg.repeats)  # noqa: E731
    # GPU time alone (CUDA graph replays): the kernel's own cost, without the host's launch overhead
    graphed = lambda fn: time_graphed_ms(fn, device, cfg.warmup, cfg.repeats)  # noqa: E731
    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    dense_graphed = graphed(lambda: F.scaled_dot_product_attention(q, k, v))
    table = {"full": 1.0, "cache": 0.0}
    if cfg.batch % 2 == 0:  # CFG sharing: the conditional half only
        half = slice(cfg.batch // 2, cfg.batch)
        table["cfg"] = timed(lambda: headwise_attention(q, k, v, [CFG] * heads, start, image_len, None, half)) / dense
    for w in tqdm(cfg.windows, desc="latency table", unit="window"):
        m = arrow(w)
        t = timed(lambda: headwise_attention(q, k, v, [m] * heads, start, image_len, None))
        table[str(m)] = t / dense
    narrowest = min(cfg.windows)
    # residual sharing (arrow+rs): later steps add the cached residual to the arrow; the refresh
    # step runs the full heads and an arrow for each of them (their difference is the residual)
    rs = HeadMethod("arrow+rs", narrowest)
    residual = torch.randn(*shape, generator=g).to(device, dtype)
    table[str(rs)] = timed(lambda: headwise_attention(q, k, v, [rs] * heads, start, image_len, None,
                                                      residual=residual)) / dense
    full_out = F.scaled_dot_product_attention(q, k, v)
    refresh = (dense + timed(lambda: arrow_residuals(q, k, v, full_out, [narrowest] * heads, start, image_len,
                                                     residual))) / dense  # not a head method: kept out of the table
    rows = []
    for p in tqdm(cfg.head_sparsities, desc="kernel", unit="sparsity"):
        for mode in ("cache", "arrow", "mixed"):
            methods = skipped_methods(heads, p, mode, narrowest)
            t = timed(lambda: headwise_attention(q, k, v, methods, start, image_len, previous, update_cache=True))
            g_ms = graphed(lambda: headwise_attention(q, k, v, methods, start, image_len, previous, update_cache=True))
            rows.append({"head_sparsity": p, "mode": mode, "window": narrowest if mode != "cache" else None,
                         "attention_sparsity": layer_sparsity(methods, image_len, text_len),
                         "ms": t * 1e3, "dense_ms": dense * 1e3, "speedup": dense / t,
                         "graphed_ms": g_ms, "graphed_dense_ms": dense_graphed,
                         "graphed_speedup": dense_graphed / g_ms if g_ms and dense_graphed else None})
    return {"dense_ms": dense * 1e3, "graphed_dense_ms": dense_graphed, "relative_latency": table,
            "residual_refresh": {"window": narrowest, "relative_latency": refresh}, "rows": rows}


class StepOneTimer:
    """Times step 1 of two-step head-wise plans on one transformer: step 0 all full and untimed
    (filling the caches), step 1 one row of methods in every layer."""

    def __init__(self, cfg, device, transformer, inputs: dict, heads: int, graphed: bool):
        self.cfg, self.device, self.transformer, self.inputs = cfg, device, transformer, inputs
        self.heads, self.graphs = heads, graphed
        self.layers = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
        # Steps are counted by the timestep value (fastattn.hooks.StepCounter): step 1 gets a timestep
        # of its own, or a second call at step 0's would count as another branch of step 0 (all full).
        self.later = {**inputs, "timestep": inputs["timestep"] * 0.9}

    def step(self, call_inputs: dict | None = None) -> None:
        with torch.no_grad():
            self.transformer(**(self.inputs if call_inputs is None else call_inputs))

    def step_one(self) -> None:
        self.step(self.later)

    @contextmanager
    def applied(self, row_of_layer) -> Iterator[tuple[object, Callable[[], None]]]:
        """The two-step plan on the transformer, with the step 0 that resets its handle and runs eagerly."""
        plan = CompressionPlan.from_heads([[["full"] * self.heads] * self.layers,
                                           [list(map(str, row_of_layer))] * self.layers])
        handle = apply_fastattn(self.transformer, plan)

        def step_zero():
            handle.reset()
            self.step()

        try:
            yield handle, step_zero
        finally:
            remove_fastattn(self.transformer)

    def seconds(self, row_of_layer) -> float:
        """Seconds of step 1 (wall clock around eager calls)."""
        with self.applied(row_of_layer) as (handle, step_zero):
            seconds = time_call(self.step_one, self.device, self.cfg.warmup, self.cfg.repeats, before=step_zero)
            if (handle.counter.step, handle.counter.branch) != (1, 0):  # else the plan's step 1 never ran
                raise RuntimeError(f"step benchmark: the timed call ran as step {handle.counter.step}, "
                                   f"branch {handle.counter.branch}, not step 1")
            return seconds

    def graphed_ms(self, row_of_layer) -> float | None:
        """GPU milliseconds of the same step 1, captured once in a CUDA graph and replayed."""
        if self.device.type != "cuda" or not self.graphs:
            return None
        with self.applied(row_of_layer) as (_, step_zero):
            # the captured call is step 1 (its Python state is set once at capture, each replay
            # reruns its kernels); warm-up calls before it run at step 0 (full)
            return time_graphed_ms(self.step_one, self.device, 4, self.cfg.repeats, calls=1, before_capture=step_zero)


def step_benchmark(cfg, device, transformer, inputs, image_len, text_len, graphed: bool = True) -> dict:
    heads = int(ARCHITECTURES[cfg.arch]["config"]["num_attention_heads"])
    timer = StepOneTimer(cfg, device, transformer, inputs, heads, graphed)
    raw = time_call(timer.step, device, cfg.warmup, cfg.repeats)
    raw_graphed = time_graphed_ms(timer.step, device, cfg.warmup, cfg.repeats, calls=1) if graphed else None
    no_attention = timer.seconds([CACHE] * heads)
    no_attention_graphed = timer.graphed_ms([CACHE] * heads)
    share = max(0.0, 1 - no_attention / raw)
    share_graphed = max(0.0, 1 - no_attention_graphed / raw_graphed) if raw_graphed and no_attention_graphed else None
    rows = []
    for s in tqdm(cfg.e2e_sparsities, desc="step", unit="sparsity"):
        row = synthetic_row(heads, s, cfg.mix, min(cfg.windows), image_len, text_len)
        actual = layer_sparsity(row, image_len, text_len)
        t = timer.seconds(row)
        ideal = 1 / ((1 - share) + share * (1 - actual))
        entry = {"target_sparsity": s, "attention_sparsity": actual, "methods": [str(m) for m in row],
                 "step_ms": t * 1e3, "speedup": raw / t, "ideal_speedup": ideal,
                 "share_of_ideal": (raw / t - 1) / (ideal - 1) if ideal > 1 else math.nan,
                 "ratio_to_ideal": (raw / t) / ideal}
        g_ms = timer.graphed_ms(row)
        if g_ms and share_graphed is not None:
            g_ideal = 1 / ((1 - share_graphed) + share_graphed * (1 - actual))
            entry.update(graphed_step_ms=g_ms, graphed_speedup=raw_graphed / g_ms, graphed_ideal_speedup=g_ideal,
                         graphed_ratio_to_ideal=raw_graphed / g_ms / g_ideal)
        rows.append(entry)
    return {"raw_step_ms": raw * 1e3, "no_attention_step_ms": no_attention * 1e3, "attention_share": share,
            "graphed_raw_step_ms": raw_graphed, "graphed_no_attention_step_ms": no_attention_graphed,
            "graphed_attention_share": share_graphed, "rows": rows}


def run_steps(transformer, inputs: dict, n: int) -> None:
    """``n`` transformer calls as ``n`` denoising steps: each at a timestep of its own, since
    fastattn's step counter starts a step at each new timestep value (a repeated one is another
    CFG branch of the same step)."""
    first = inputs["timestep"]
    with torch.no_grad():
        for i in range(n):
            transformer(**{**inputs, "timestep": first * (1 - i / n)})


def loop_benchmark(cfg, device, transformer, inputs, image_len, text_len) -> dict:
    """A loop of ``loop_steps`` transformer calls (step 0 full, then the synthetic plan) eager and
    under the library's CUDA graphs (``apply_fastattn(..., cuda_graphs=True)``), each against raw
    in the same mode (graphed raw: an all-full plan, every layer on the model's own processor). The
    attention share a of each mode comes from its loop without attention (every head cached)."""
    heads = int(ARCHITECTURES[cfg.arch]["config"]["num_attention_heads"])
    layers = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    n = int(cfg.loop_steps)

    def loop():
        run_steps(transformer, inputs, n)

    def loop_seconds(row_of_layer, graphs: bool) -> float:
        if row_of_layer is None and not graphs:
            return time_call(loop, device, cfg.warmup, cfg.repeats)
        row = [FULL] * heads if row_of_layer is None else row_of_layer
        plan = CompressionPlan.from_heads([[["full"] * heads] * layers]
                                          + [[list(map(str, row))] * layers] * (n - 1))
        apply_fastattn(transformer, plan, cuda_graphs=graphs)
        try:  # the warm-up's first loop captures each step layout; later loops replay
            return time_call(loop, device, max(1, cfg.warmup), cfg.repeats)
        finally:
            remove_fastattn(transformer)

    modes = [False] + ([True] if device.type == "cuda" else [])
    rows = []
    for graphs in modes:
        raw = loop_seconds(None, graphs)
        without = loop_seconds([CACHE] * heads, graphs)
        share = share_from_loops(raw, without, n)
        for s in tqdm(cfg.e2e_sparsities, desc="loop graphed" if graphs else "loop eager", unit="sparsity"):
            row = synthetic_row(heads, s, cfg.mix, min(cfg.windows), image_len, text_len)
            actual = layer_sparsity(row, image_len, text_len)
            t = loop_seconds(row, graphs)
            f = 1 - actual * (n - 1) / n  # the loop's attention FLOPs fraction: step 0 is full
            ideal = 1 / ((1 - share) + share * f)
            rows.append({"mode": "graphed" if graphs else "eager", "attention_sparsity": actual, "loop_ms": t * 1e3, "raw_ms": raw * 1e3,
                         "attention_share": share, "speedup": raw / t, "ideal_speedup": ideal,
                         "ratio_to_ideal": raw / t / ideal})
    return {"steps": n, "rows": rows}


def search_benchmark(cfg, device, transformer, inputs) -> dict:
    """Seconds of ``search_steps`` transformer calls under the head-wise search against raw calls:
    the search's cost in generations (the transformer's share of one; VAE and text encoders excluded)."""
    from fastattn.headwise.apply import install_headwise
    from fastattn.headwise.latency import LatencyTable
    from fastattn.search.headwise import HeadwiseSearch

    steps = int(cfg.search_steps)

    def raw_steps():
        run_steps(transformer, inputs, steps)

    def searched_steps():
        handle = install_headwise(transformer)
        search = HeadwiseSearch(handle.state, list(cfg.windows), True, True, 0.2, 1.5, LatencyTable(), False)
        handle.state.decide = search
        search.start(steps)
        try:
            raw_steps()
        finally:
            remove_fastattn(transformer)

    raw = time_call(raw_steps, device, min(cfg.warmup, 1), max(1, cfg.repeats // 3))
    searched = time_call(searched_steps, device, min(cfg.warmup, 1), max(1, cfg.repeats // 3))
    return {"steps": steps, "raw_s": raw, "search_s": searched, "search_over_generation": searched / raw}


# (title, title width, row key, value format, unit) of each column of the printed tables
KERNEL_COLUMNS = (("head sparsity", 13, "head_sparsity", ">13.2f", ""), ("mode", 6, "mode", ">6", ""),
                  ("attn sparsity", 13, "attention_sparsity", ">13.3f", ""), ("ms", 9, "ms", ">9.3f", ""),
                  ("speed-up", 8, "speedup", ">7.2f", "x"))
STEP_COLUMNS = (("sparsity", 8, "attention_sparsity", ">8.3f", ""), ("step ms", 9, "step_ms", ">9.2f", ""),
                ("speed-up", 8, "speedup", ">7.3f", "x"), ("ideal", 7, "ideal_speedup", ">6.3f", "x"),
                ("of ideal", 8, "ratio_to_ideal", ">7.1%", ""))


LOOP_COLUMNS = (("mode", 7, "mode", ">7", ""), ("sparsity", 8, "attention_sparsity", ">8.3f", ""),
                ("a", 5, "attention_share", ">5.3f", ""), ("loop ms", 9, "loop_ms", ">9.1f", ""),
                ("raw ms", 9, "raw_ms", ">9.1f", ""), ("speed-up", 8, "speedup", ">7.3f", "x"),
                ("ideal", 7, "ideal_speedup", ">6.3f", "x"), ("of ideal", 8, "ratio_to_ideal", ">7.1%", ""))


def _kernel_graphed(r: dict) -> str:
    return f"  graphed {r['graphed_ms']:.3f} ms {r['graphed_speedup']:.2f}x" if r.get("graphed_ms") else ""


def _step_graphed(r: dict) -> str:
    if not r.get("graphed_step_ms"):
        return ""
    return (f"  graphed {r['graphed_step_ms']:.2f} ms {r['graphed_speedup']:.3f}x of ideal "
            f"{r['graphed_ideal_speedup']:.3f}x ({r['graphed_ratio_to_ideal']:.1%})")


def _table(columns, rows: list[dict], graphed: Callable[[dict], str]) -> list[str]:
    """A title line, then one line per row: its columns, then its CUDA-graph figures where it has them."""
    return [" ".join(f"{title:>{width}}" for title, width, *_ in columns)] + [
        " ".join(f"{r[key]:{fmt}}{unit}" for _, _, key, fmt, unit in columns) + graphed(r) for r in rows]


def format_table(result: dict) -> str:
    lines = [f"head-wise benchmark | {result['arch']} {result['resolution']}px | image {result['image_tokens']} + "
             f"text {result['text_tokens']} tokens | {result['device']} | {result['dtype']}"]
    if "kernel" in result:
        k = result["kernel"]
        lines.append(f"kernel (one layer, dense {k['dense_ms']:.3f} ms)  relative latency per head: "
                     + ", ".join(f"{m} {v:.3f}" for m, v in k["relative_latency"].items())
                     + (f"; residual refresh (full + arrow:{r['window']:g}) {r['relative_latency']:.3f}"
                        if (r := k.get("residual_refresh")) else ""))  # absent from earlier results
        lines += _table(KERNEL_COLUMNS, k["rows"], _kernel_graphed)
    if "step" in result:
        s = result["step"]
        lines.append(f"step: raw {s['raw_step_ms']:.2f} ms, without attention {s['no_attention_step_ms']:.2f} ms, "
                     f"attention share a = {s['attention_share']:.3f}")
        lines += _table(STEP_COLUMNS, s["rows"], _step_graphed)
    if "step_compiled" in result:
        s = result["step_compiled"]
        lines.append(f"step, compiled ({result['config'].get('compile')}): raw {s['raw_step_ms']:.2f} ms, without "
                     f"attention {s['no_attention_step_ms']:.2f} ms, attention share a = {s['attention_share']:.3f}")
        lines += _table(STEP_COLUMNS, s["rows"], _step_graphed)
    if "loop" in result:
        lines.append(f"loop of {result['loop']['steps']} steps (step 0 full), against raw in the same mode:")
        lines += _table(LOOP_COLUMNS, result["loop"]["rows"], lambda r: "")
    if "search" in result:
        r = result["search"]
        lines.append(f"search: {r['steps']} steps {r['search_s']:.2f} s against {r['raw_s']:.2f} s raw = "
                     f"{r['search_over_generation']:.2f} generations' transformer time")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"arch: unknown architecture {cfg.arch!r} (known: {', '.join(ARCHITECTURES)})")
    for name in ("windows", "head_sparsities", "e2e_sparsities"):
        check_fractions(cfg, name)
    if cfg.mix not in ("cache", "arrow", "mixed"):
        raise ConfigError(f"mix: expected cache, arrow or mixed, got {cfg.mix!r}")
    if cfg.get("compile") not in (None, *COMPILE_MODES):
        raise ConfigError(f"compile: {cfg.compile!r} is not null, {' or '.join(COMPILE_MODES)}")
    unknown = set(cfg.parts) - {"kernel", "step", "loop", "search"}
    if unknown:
        raise ConfigError(f"parts: unknown {sorted(unknown)} (known: kernel, step, loop, search)")
    check_choice(cfg, "dtype", DTYPES)
    check_device(cfg)
    split = cfg.get("split_full_heads_from_tokens")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 0):
        raise ConfigError(f"split_full_heads_from_tokens: expected null or an integer >= 0, got {split!r}")
    use_fa4(cfg)
    default_split = arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS
    if split is not None:
        arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS = split
    try:
        with prefer_fast_dense():  # raw, full heads and the dense reference on the same kernel
            return _measure(cfg)
    finally:
        arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS = default_split


def _measure(cfg: DictConfig) -> dict:
    device, dtype = resolve_device(cfg.device), parse_dtype(cfg.dtype)
    spec = ARCHITECTURES[cfg.arch]
    text_len = int(cfg.text_len if cfg.text_len is not None else spec["text_len"])
    image_len = image_tokens(cfg.arch, int(cfg.resolution))
    heads, head_dim = spec["config"]["num_attention_heads"], spec["config"]["attention_head_dim"]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"arch": cfg.arch, "resolution": int(cfg.resolution), "batch": int(cfg.batch), "image_tokens": image_len,
              "text_tokens": text_len, "heads": heads, "head_dim": head_dim, "dtype": cfg.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "split_full_heads_from_tokens": arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    if "kernel" in cfg.parts:
        result["kernel"] = kernel_benchmark(cfg, device, dtype, heads, head_dim, image_len, text_len)
        atomic_write_json(out_dir / "latency_table.json", {
            "arch": cfg.arch, "resolution": int(cfg.resolution), "device": result["device"],
            ARROW_FRACTION_KEY: "each_side", "relative_latency": result["kernel"]["relative_latency"]})
    if {"step", "loop", "search"} & set(cfg.parts):
        transformer = build_random_transformer(cfg.arch, device, dtype, cfg.seed)
        inputs = random_transformer_inputs(cfg.arch, transformer, cfg.resolution, cfg.batch, text_len, cfg.seed)
        if "step" in cfg.parts:
            result["step"] = step_benchmark(cfg, device, transformer, inputs, image_len, text_len)
            if cfg.get("compile"):  # the same rows with the transformer compiled (raw and plans alike)
                with compiled(transformer, cfg.compile, cfg.get("compile_backend", "inductor"),
                              cfg.get("compile_mode")):
                    result["step_compiled"] = step_benchmark(cfg, device, transformer, inputs, image_len, text_len,
                                                             graphed=False)
        if "loop" in cfg.parts:
            result["loop"] = loop_benchmark(cfg, device, transformer, inputs, image_len, text_len)
        if "search" in cfg.parts:
            result["search"] = search_benchmark(cfg, device, transformer, inputs)
    result["compiled_graphs"] = _compiled_graphs()
    atomic_write_json(out_dir / "benchmark_headwise.json", result)
    print(format_table(result))
    return result


def _compiled_graphs() -> int | None:
    """Graphs torch.compile built (FlexAttention): a number growing with the plans means recompiles."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # private API; informative only
        return None


main = hydra_app("benchmark_headwise", run)

if __name__ == "__main__":
    main()
