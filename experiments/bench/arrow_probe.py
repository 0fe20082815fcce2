"""What one head-wise arrow layer costs at a real shape, kernel by kernel: dense cuDNN and dense
FlexAttention, the arrow band made of whole 128-token tiles (what runs) against the token band
|q - k| <= w (whose blocks are nearly all partial and evaluate the mask per element), a few
Flex tile configurations, and 75% head-sparse layers with the full heads inside the Flex call
or split out to cuDNN. GPU times come from CUDA graph replays (no launch overhead).

    python -m experiments.bench.arrow_probe arch=flux_dev resolution=2048 batch=1
    python -m experiments.bench.arrow_probe arch=sd3_medium resolution=1024 batch=2
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import fastattn.kernels.arrow as arrow_kernels
from fastattn.headwise.methods import CACHE, FULL, arrow
from fastattn.headwise.processor import headwise_attention
from fastattn.kernels.arrow import arrow_block_mask, arrow_tile, tile_radius_of

from .head_rows import synthetic_row
from ..infra.app import hydra_app
from ..infra.config import check_choice, check_fractions, check_int, require_cuda
from ..infra.timing import time_graphed_ms, time_ms
from ..models.architectures import ARCHITECTURES, image_tokens
from .probes import block_density, save_rows

FLEX_CONFIGS = ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
                {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2})


def shape_of(arch: str, resolution: int, batch: int) -> dict:
    spec = ARCHITECTURES[arch]
    image_len, text_len = image_tokens(arch, resolution), spec["text_len"]
    text_first = spec["cls"] != "SD3Transformer2DModel"
    return {"batch": batch, "heads": spec["config"]["num_attention_heads"],
            "head_dim": spec["config"]["attention_head_dim"], "image_len": image_len, "text_len": text_len,
            "image_start": text_len if text_first else 0}


def probe(shape: dict, windows, device: torch.device, dtype: torch.dtype, repeats: int, configs=FLEX_CONFIGS,
          compile_flex: bool = True) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    b, h, d = shape["batch"], shape["heads"], shape["head_dim"]
    seq = shape["image_len"] + shape["text_len"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, previous = (torch.randn(b, h, seq, d, generator=g).to(device, dtype) for _ in range(4))
    rows: list[dict] = []
    add = row_recorder(rows, device, repeats)

    with torch.no_grad():
        add("dense cuDNN (SDPA), all heads", lambda: F.scaled_dot_product_attention(q, k, v))
        add("dense FlexAttention, all heads", lambda: flex(q, k, v))
        options = arrow_kernels.FLEX_OPTIONS_BY_HEAD_DIM.get(d)
        if options:
            add(f"dense FlexAttention, all heads, {options}", lambda: flex(q, k, v, kernel_options=options))
        tile = arrow_tile(shape["image_len"])
        for f in windows:  # the tile configurations only at the first window
            probe_window(add, flex, (q, k, v), shape, f, tile, configs if f == windows[0] else (), device)
        narrow = arrow(min(windows))
        for name, methods in head_sparse_layers(shape, windows, narrow).items():
            probe_full_heads(add, name, methods, narrow, (q, k, v, previous), shape)
    return rows


def row_recorder(rows: list[dict], device: torch.device, repeats: int) -> Callable[..., None]:
    """``add(name, fn, blocks=None)``: times ``fn`` eagerly and as CUDA graph replays, appends its
    row to ``rows`` (relative to the first row, the dense baseline) and prints it."""
    def add(name, fn, blocks=None):
        ms = time_ms(fn, device, 2, repeats)
        graphed = time_graphed_ms(fn, device, 2, repeats, calls=5)
        base = rows[0]["graphed_ms"] if rows and rows[0]["graphed_ms"] else (rows[0]["ms"] if rows else None)
        rel = (graphed or ms) / base if base else 1.0
        rows.append({"kernel": name, "ms": ms, "graphed_ms": graphed, "of_dense": rel, "block_density": blocks})
        print(f"{name:58s} {ms:8.3f} ms  graphed {graphed or float('nan'):8.3f} ms  {rel:6.3f} of dense"
              + (f"  blocks {blocks:.3f}" if blocks is not None else ""), flush=True)

    return add


def probe_window(add, flex, qkv, shape: dict, f: float, tile: int, configs, device: torch.device) -> None:
    """Arrow window ``f`` as the token band and as whole tiles, then the tiles under each of ``configs``."""
    q, k, v = qkv
    h, start, image_len = shape["heads"], shape["image_start"], shape["image_len"]
    seq = image_len + shape["text_len"]
    w = arrow(f).half_width(image_len)
    r = tile_radius_of(w, image_len)
    tiled = arrow_block_mask(seq, start, image_len, (r,) * h, tile, device)
    token = arrow_block_mask(seq, start, image_len, (w,) * h, 1, device)
    add(f"arrow 1/{round(1 / f)}, token band (w={w})", lambda: flex(q, k, v, block_mask=token),
        block_density(token))
    add(f"arrow 1/{round(1 / f)}, {tile}-token tiles (r={r})", lambda: flex(q, k, v, block_mask=tiled),
        block_density(tiled))
    for opts in configs:
        try:
            add(f"  same, {opts}", lambda: flex(q, k, v, block_mask=tiled, kernel_options=opts),
                block_density(tiled))
        except Exception as err:  # noqa: BLE001 - a configuration this GPU cannot run
            print(f"  {opts}: {type(err).__name__}: {str(err)[:120]}")


def head_sparse_layers(shape: dict, windows, narrow) -> dict[str, list]:
    """75% head-sparse layers (a quarter of the heads full; the rest cached, ``narrow`` arrow or
    both), and the rows the step benchmark runs, by label."""
    h = shape["heads"]
    quarter = h // 4
    layers = {f"75% cached ({quarter} of {h} heads full)": [CACHE] * (h - quarter) + [FULL] * quarter,
              f"75% arrow {narrow}": [narrow] * (h - quarter) + [FULL] * quarter,
              f"75% mixed (cache + arrow {narrow})": [CACHE, narrow] * ((h - quarter) // 2)
              + [CACHE] * ((h - quarter) % 2) + [FULL] * quarter}
    for target in (0.43, 0.68):  # the rows the step benchmark runs in every layer
        row = synthetic_row(h, target, "mixed", min(windows), shape["image_len"], shape["text_len"])
        layers[f"step row at sparsity {target} ({_counts(row)})"] = row
    return layers


def probe_full_heads(add, name: str, methods, narrow, tensors, shape: dict) -> None:
    """One head-wise layer with its full heads split out to cuDNN, then inside the Flex call."""
    q, k, v, previous = tensors
    start, image_len = shape["image_start"], shape["image_len"]
    default_split = arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS
    for split in (True, False):
        if not split and narrow not in methods:
            continue  # no Flex call either way
        arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS = 0 if split else 10**9
        try:
            add(f"{name}, full heads {'by cuDNN' if split else 'in Flex'}",
                lambda: headwise_attention(q, k, v, methods, start, image_len, previous, update_cache=True))
        finally:
            arrow_kernels.SPLIT_FULL_HEADS_FROM_TOKENS = default_split


def _counts(methods) -> str:
    names = [str(m) for m in methods]
    return ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names))


def check_config(cfg: DictConfig) -> None:
    check_choice(cfg, "arch", sorted(ARCHITECTURES))
    check_int(cfg, "resolution", "batch", "repeats")
    check_fractions(cfg, "windows")
    require_cuda("arrow_probe (FlexAttention kernels)")


def arrow_probe(cfg: DictConfig) -> list[dict]:
    check_config(cfg)
    shape = shape_of(cfg.arch, cfg.resolution, cfg.batch)
    print(f"{cfg.arch} {cfg.resolution}px: {shape}")
    rows = probe(shape, list(cfg.windows), torch.device("cuda"), torch.bfloat16, cfg.repeats)
    save_rows(cfg, rows, shape=shape)
    return rows


main = hydra_app("arrow_probe", arrow_probe)

if __name__ == "__main__":
    main()
