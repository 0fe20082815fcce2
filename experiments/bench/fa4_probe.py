"""FlashAttention-4 against today's kernels at the models' shapes, in one process (GPU).

Per shape: dense (cuDNN SDPA, FA4), the 1-D band at 1/8 and 1/16 (FA4; FlexAttention's band is in
the kernel sweep of ``experiments.benchmark``), the WA-RS refresh by each FA4 route, and the host
time of one call (what an eager step pays per layer);
the head-wise arrow at FLUX 2048² and SD3 1024² (Flex vs block-sparse FA4); Wan's 3-D tile
window (Flex vs FA4); whether a compiled raw-model attention call keeps one graph.

    python -m experiments.bench.fa4_probe out=probe.json
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

import fastattn.kernels.arrow as arrow
from fastattn.kernels import fa4, fa4_mode, prefer_fast_dense
from fastattn.kernels.masks import band_pairs, window_half_width
from fastattn.kernels.video_masks import (
    sparse_tile_window_attention,
    tile_pairs,
    tile_shape,
)

from ..infra.app import hydra_app
from ..infra.config import check_int, require_cuda
from ..infra.timing import time_graphed_ms, time_ms
from .kernels import TARGET_WINDOW_SIZE as BAND_1_8  # "the 1/8 band": 1/16 on each side

SHAPES = {  # name: (batch, heads, seq, head_dim)
    "pixart_2k": (2, 16, 16384, 72),
    "pixart_1k": (2, 16, 4096, 72),
    "flux_2k": (1, 24, 16896, 128),
    "wan_480p": (1, 12, 32760, 128),
}


def qkv(shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def host_us(fn, calls=30) -> float:
    """Host microseconds per call (no synchronisation inside; the GPU queue absorbs the work)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return 1e6 * host


def kernel_rows(name, shape, warmup, repeats, graphed: bool) -> dict:
    q, k, v = qkv(shape)
    seq = shape[2]
    t = (lambda fn: time_graphed_ms(fn, torch.device("cuda"), warmup, repeats)) if graphed else (
        lambda fn: time_ms(fn, torch.device("cuda"), warmup, repeats))
    row = {"shape": shape, "timer": "graphed" if graphed else "events"}
    row["cudnn_dense"] = t(lambda: cudnn(q, k, v))
    row["fa4_dense"] = t(lambda: fa4.dense(q, k, v))
    for label, window_size in (("1_8", 0.0625), ("1_16", 0.03125)):  # total band 1/8, 1/16
        w = window_half_width(seq, window_size)
        row[f"pairs_{label}"] = band_pairs(seq, w) / seq**2
        row[f"fa4_band_{label}"] = t(lambda: fa4.window(q, k, v, w))
    w = window_half_width(seq, BAND_1_8)
    for route in fa4.REFRESH_ROUTES:
        row[f"fa4_refresh_{route}"] = t(lambda: fa4.refresh(q, k, v, w, route))
    for label, fn in (("cudnn_dense", lambda: cudnn(q, k, v)), ("fa4_dense", lambda: fa4.dense(q, k, v)),
                      ("fa4_band", lambda: fa4.window(q, k, v, w)),
                      ("fa4_refresh", lambda: fa4.refresh(q, k, v, w))):
        row[f"host_us_{label}"] = host_us(fn)
    best = min(row["cudnn_dense"], row["fa4_dense"])
    row["best_dense"] = best
    row["window_1_8_bound"] = 1.25 * row["pairs_1_8"] * best
    row["refresh_bound"] = 1.1 * best
    return row


def refresh_blocks(shape, warmup, repeats) -> dict:
    """The off-band pass with FA4's own dense tile as its block against 128 x 128 blocks."""
    q, k, v = qkv(shape)
    w = window_half_width(shape[2], BAND_1_8)
    out = {}
    default = fa4.refresh_block_size
    for label, size in (("dense_tile", default(shape[3])), ("128x128", (128, 128))):
        fa4.refresh_block_size = lambda d, s=size: s
        try:
            out[label] = {"block": size, "ms": time_ms(lambda: fa4.refresh(q, k, v, w, "merge"), torch.device("cuda"),
                                                       warmup, repeats)}
        finally:
            fa4.refresh_block_size = default
    return out


def arrow_rows(batch, heads, image, text, dim, text_first, warmup, repeats) -> dict:
    seq = image + text
    start = text if text_first else 0
    q, k, v = qkv((batch, heads, seq, dim))
    t = lambda fn: time_ms(fn, torch.device("cuda"), warmup, repeats)
    res = {"shape": (batch, heads, seq, dim), "cudnn_dense": t(lambda: cudnn(q, k, v)),
           "fa4_dense": t(lambda: fa4.dense(q, k, v)), "rows": []}
    tile = arrow.arrow_tile(image)
    plans = {f"radius {r}": [r * tile] * heads for r in (1, 4, 8)}
    n_full, n_arrow = round(heads * 7 / 24), round(heads * 7 / 24)
    plans["7 full, 7 arrow 1/32, 10 cache"] = ([image] * n_full + [image // 64] * n_arrow
                                               + [arrow.SKIP] * (heads - n_full - n_arrow))
    for label, widths in plans.items():
        row = {"plan": label}
        with fa4_mode("off"):
            row["flex_ms"] = t(lambda: arrow.arrow_attention(q, k, v, widths, start, image))
        row["fa4_ms"] = t(lambda: arrow.arrow_attention(q, k, v, widths, start, image))
        radii = tuple(arrow.tile_radius_of(w, image) for w in widths)
        nonempty, _ = arrow.arrow_blocks(seq, start, image, radii, tile, q.device, arrow.ARROW_TILE)
        row["blocks_kept"] = nonempty.float().mean().item()
        res["rows"].append(row)
    return res


def video_rows(warmup, repeats) -> dict:
    grid = (21, 30, 52)
    tile = tile_shape(grid, BAND_1_8)
    n = math.prod(grid)
    q, k, v = qkv((1, 12, n, 128))
    t = lambda fn: time_ms(fn, torch.device("cuda"), warmup, repeats)
    return {"grid": grid, "tile": tile, "pairs": tile_pairs(grid, tile) / n**2,
            "cudnn_dense": t(lambda: cudnn(q, k, v)), "fa4_dense": t(lambda: fa4.dense(q, k, v)),
            "flex_tile": t(lambda: sparse_tile_window_attention(q, k, v, grid, tile, use_fa4=False)),
            "fa4_tile": t(lambda: sparse_tile_window_attention(q, k, v, grid, tile, use_fa4=True)),
            "fa4_band_1_8": t(lambda: fa4.window(q, k, v, window_half_width(n, BAND_1_8)))}


def compile_check() -> dict:
    """Graphs and breaks of a compiled raw-model attention call routed to FA4."""
    q, k, v = qkv((2, 16, 4096, 72))
    with prefer_fast_dense():
        F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v) * 2)(q, k, v)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count}


def fa4_probe(args) -> None:
    check_int(args, "repeats")
    check_int(args, "warmup", minimum=0)
    require_cuda("fa4_probe")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": {}}

    def step(key, fn):
        try:
            result[key] = fn()
        except Exception as e:
            result[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    for name, shape in SHAPES.items():
        step(f"kernel_{name}", lambda: kernel_rows(name, shape, args.warmup, args.repeats, graphed=False))
    step("kernel_pixart_1k_graphed", lambda: kernel_rows("pixart_1k", SHAPES["pixart_1k"], args.warmup, args.repeats,
                                                         graphed=True))
    step("refresh_blocks_pixart_2k", lambda: refresh_blocks(SHAPES["pixart_2k"], args.warmup, args.repeats))
    step("arrow_flux_2k", lambda: arrow_rows(1, 24, 16384, 512, 128, True, args.warmup, args.repeats))
    step("arrow_sd3_1k", lambda: arrow_rows(2, 24, 4096, 333, 64, False, args.warmup, args.repeats))
    step("video_wan", lambda: video_rows(args.warmup, args.repeats))
    step("compile", compile_check)
    for key, r in result.items():
        if isinstance(r, dict) and "error" in r:
            print(f"{key}: {r['error'][:300]}")
    for name in SHAPES:
        r = result.get(f"kernel_{name}", {})
        if "fa4_dense" in r:
            print(f"{name:10s} cudnn {r['cudnn_dense']:.3f} fa4 {r['fa4_dense']:.3f} | fa4 band 1/8 "
                  f"{r['fa4_band_1_8']:.3f} (bound {r['window_1_8_bound']:.3f}) 1/16 {r['fa4_band_1_16']:.3f} | "
                  f"refresh merge {r['fa4_refresh_merge']:.3f} two-pass {r['fa4_refresh_two_pass']:.3f} (bound "
                  f"{r['refresh_bound']:.3f}) | host us fa4 dense/band/refresh {r['host_us_fa4_dense']:.0f}/"
                  f"{r['host_us_fa4_band']:.0f}/{r['host_us_fa4_refresh']:.0f} cudnn {r['host_us_cudnn_dense']:.0f}")
    for key in ("arrow_flux_2k", "arrow_sd3_1k"):
        r = result.get(key, {})
        for row in r.get("rows", []):
            print(f"{key} {row['plan']:32s} blocks {row['blocks_kept']:.3f} flex {row['flex_ms']:.3f} "
                  f"fa4 {row['fa4_ms']:.3f} (dense cudnn {r['cudnn_dense']:.3f} fa4 {r['fa4_dense']:.3f})")
    print("video", {k: v for k, v in result.get("video_wan", {}).items()})
    print("refresh blocks", result.get("refresh_blocks_pixart_2k"), "compile", result.get("compile"))


main = hydra_app("fa4_probe", fa4_probe)

if __name__ == "__main__":
    main()
