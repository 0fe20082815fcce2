"""Kernel sweep: dense kernels (SDPA backends, FlashAttention-4), band and tile windows at several
sizes, and the WA-RS refresh by each route, on random q/k/v of one attention layer."""

from __future__ import annotations

import itertools
import math

import torch

from fastattn.kernels import (band_pairs, dense_attention, fa4_mode, prefer_fast_dense, refresh_attention,
                              set_window_backend, tile_attention, tile_radius, window_attention, window_half_width)
from fastattn.kernels import fa4, triton_band
from fastattn.kernels.masks import tile_pairs

from ..infra.timing import time_ms

TUNING_SPACE = {"BLOCK_M": (64, 128), "BLOCK_N": (64, 128), "num_warps": (4, 8), "num_stages": (2, 3)}


def dense_backends(device: torch.device) -> dict:
    """SDPA backends to try; each entry is a context manager factory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if device.type != "cuda":
        return {"math": lambda: sdpa_kernel([SDPBackend.MATH])}
    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {name: (lambda b=b: sdpa_kernel([b])) for name, b in names.items()}


def qkv(batch, heads, seq_len, head_dim, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3)]


def best_dense(q, k, v, device, warmup, repeats) -> dict:
    times = {}
    for name, ctx in dense_backends(device).items():
        try:
            with ctx(), fa4_mode("off"):
                times[name] = time_ms(lambda: dense_attention(q, k, v), device, warmup, repeats)
        except RuntimeError:  # backend not available for this shape / GPU
            continue
    if fa4.enabled_for(q):
        times["fa4"] = time_ms(lambda: fa4.dense(q, k, v), device, warmup, repeats)
    best = min(times, key=times.get)
    return {"per_backend_ms": times, "best": best, "best_ms": times[best]}


def tune_triton(q, k, v, half_width, device, repeats) -> dict:
    """Pick tile sizes per kernel mode at this shape (the winners are used for the rest of the run)."""
    chosen = {}
    for mode, fn in ((triton_band.MODE_WINDOW_RESIDUAL, lambda: triton_band.triton_window(q, k, v, half_width, q)),
                     (triton_band.MODE_REFRESH, lambda: triton_band.triton_refresh(q, k, v, half_width))):
        results = []
        for values in itertools.product(*TUNING_SPACE.values()):
            config = dict(zip(TUNING_SPACE, values))
            triton_band.set_kernel_config(mode, **config)
            try:
                results.append((time_ms(fn, device, 1, repeats), config))
            except Exception:  # noqa: BLE001 - a config that does not fit shared memory is skipped
                continue
        ms, config = min(results, key=lambda r: r[0])
        triton_band.set_kernel_config(mode, **config)
        if mode == triton_band.MODE_WINDOW_RESIDUAL:
            triton_band.set_kernel_config(triton_band.MODE_WINDOW, **config)
        chosen[mode] = {"config": config, "ms": ms}
    return {"window": chosen[triton_band.MODE_WINDOW_RESIDUAL], "refresh": chosen[triton_band.MODE_REFRESH]}


def window_backends(device: torch.device, q: torch.Tensor | None = None) -> list[str]:
    if device.type != "cuda":
        return ["sdpa"]
    return (["fa4"] if q is not None and fa4.enabled_for(q) else []) + (
        ["triton"] if triton_band.triton is not None else []) + ["flex"]


# The kernels' targets (issues 4 and 20) are set on "the 1/8 band": a band whose total width is
# 1/8 of the tokens, i.e. window_size 1/16 on each side (half the paper's WA-RS window).
TARGET_WINDOW_SIZE = 0.0625


def sweep(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """Everything for each sequence length in ``cfg.seq_lens``."""
    rows, tuning = [], None
    if device.type == "cuda" and cfg.tune and triton_band.triton is not None:
        q, k, v = qkv(cfg.batch, cfg.heads, cfg.target_seq_len, cfg.head_dim, device, dtype)
        tuning = tune_triton(q, k, v, window_half_width(cfg.target_seq_len, TARGET_WINDOW_SIZE), device, max(3, cfg.repeats // 2))
    for seq_len in cfg.seq_lens:
        q, k, v = qkv(cfg.batch, cfg.heads, seq_len, cfg.head_dim, device, dtype)
        dense = best_dense(q, k, v, device, cfg.warmup, cfg.repeats)
        base = {"seq_len": seq_len, "dense_backend": dense["best"], "dense_ms": dense["best_ms"],
                "dense_per_backend_ms": dense["per_backend_ms"]}
        for window_size in cfg.window_sizes:
            w = window_half_width(seq_len, window_size)
            band_frac = band_pairs(seq_len, w) / seq_len**2
            for backend in window_backends(device, q):
                set_window_backend(backend)
                ms = time_ms(lambda: window_attention(q, k, v, w), device, cfg.warmup, cfg.repeats)
                rows.append({**base, "kernel": "window", "shape": "band", "backend": backend, "window_size": window_size,
                             "flops_fraction": band_frac, "ms": ms, "vs_dense": ms / dense["best_ms"]})
            set_window_backend("auto")
            side = math.isqrt(seq_len)
            if side * side == seq_len:
                r = tile_radius(seq_len, window_size)
                # tile_attention: FA4 block-sparse under "auto" where it runs, FlexAttention under "flex"
                tile_backends = ["auto", "flex"] if fa4.sparse_enabled_for(q) else ["auto"]
                for backend in tile_backends:
                    set_window_backend(backend)
                    ms = time_ms(lambda: tile_attention(q, k, v, r, side), device, cfg.warmup, cfg.repeats)
                    name = "fa4" if backend == "auto" and fa4.sparse_enabled_for(q) else (
                        "flex" if device.type == "cuda" else "sdpa")
                    rows.append({**base, "kernel": "window", "shape": "tile", "backend": name, "window_size": window_size,
                                 "flops_fraction": tile_pairs(side, side, r) / seq_len**2, "ms": ms,
                                 "vs_dense": ms / dense["best_ms"]})
                set_window_backend("auto")
        w = window_half_width(seq_len, TARGET_WINDOW_SIZE)
        # The refresh's routes: FA4's band + off-band keys merged by log-sum-exp, and its dense +
        # band + subtraction; one Triton pass (O and R together); cuDNN + FlexAttention band +
        # subtraction (refresh_attention with the flex backend, FA4 off: the route before FA4).
        routes = {"dense+window": ("flex" if device.type == "cuda" else "sdpa", "off")}
        if "triton" in window_backends(device):
            routes["fused"] = ("triton", "off")
        if "fa4" in window_backends(device, q):
            routes.update({f"fa4 {r}": ("fa4", r) for r in fa4.REFRESH_ROUTES})
        for name, (backend, route) in routes.items():
            set_window_backend(backend)
            if backend == "fa4":
                ms = time_ms(lambda: fa4.refresh(q, k, v, w, route), device, cfg.warmup, cfg.repeats)
            else:
                with prefer_fast_dense(), fa4_mode("off"):
                    ms = time_ms(lambda: refresh_attention(q, k, v, w), device, cfg.warmup, cfg.repeats)
            rows.append({**base, "kernel": "refresh", "shape": "band", "backend": name, "window_size": TARGET_WINDOW_SIZE,
                         "ms": ms, "vs_dense": ms / dense["best_ms"]})
        set_window_backend("auto")
    return {"rows": rows, "triton_tuning": tuning,
            "shape": {"batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": str(dtype)}}


def targets(result: dict, target_seq_len: int, window_factor: float = 1.25) -> dict:
    """The kernel targets at ``target_seq_len`` against the best dense kernel (FA4 included):
    window <= ``window_factor`` x pairs fraction x dense (1.25 in issue 20, 1.2 before), refresh <= 1.1 x dense."""
    rows = [r for r in result["rows"] if r["seq_len"] == target_seq_len]
    out = {}
    window = [r for r in rows if r["kernel"] == "window" and r["shape"] == "band"
              and r["window_size"] == TARGET_WINDOW_SIZE]
    if window:
        best = min(window, key=lambda r: r["ms"])
        bound = window_factor * best["flops_fraction"] * best["dense_ms"]
        out["window_1_8"] = {"backend": best["backend"], "bound_ms": bound, "ratio_to_bound": best["ms"] / bound,
                             "pass": best["ms"] <= bound}
    refresh = [r for r in rows if r["kernel"] == "refresh"]
    if refresh:
        best = min(refresh, key=lambda r: r["ms"])
        out["refresh"] = {"route": best["backend"], "vs_dense": best["vs_dense"], "pass": best["vs_dense"] <= 1.1}
    return out
