"""What bounds a FlexAttention window kernel at one shape: the window's block mask as built
(partial blocks evaluate the mask per element), the same blocks all treated as full (the cost of
the block count alone), a dense Flex call (Flex's own throughput) and dense cuDNN, plus a few
tile configurations. Used for Wan's 3-D tile window (32,760 tokens, head dim 128).

    python -m experiments.bench.window_probe grid=[21,30,52] heads=12 head_dim=128
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from fastattn.kernels import prefer_fast_dense
from fastattn.kernels.masks import window_half_width
from fastattn.kernels.video_masks import tile_block_mask, tile_major_order, tile_shape

from ..infra.app import ConfigError, hydra_app
from ..infra.config import check_fraction, check_int, require_cuda
from ..infra.timing import time_ms
from .probes import block_density, save_rows


def all_full(block_mask):
    """The same non-empty blocks, every one marked full (no per-element mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    dense = block_mask.to_dense().bool()  # [B, H, q blocks, kv blocks]
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    num = dense.sum(-1).to(torch.int32)
    empty = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(empty, order, num, order, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                    seq_lengths=block_mask.seq_lengths)


def probe(grid, heads, head_dim, window_size, device, dtype, repeats) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    n = math.prod(grid)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    tile = tile_shape(grid, window_size)
    tiles = tile_block_mask(grid, tile, 1, device)
    w = window_half_width(n, window_size)
    band = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= w, None, None, n, n, device=device)
    rows = []

    def add(name, fn, blocks=None):
        ms = time_ms(fn, device, 2, repeats)
        rows.append({"kernel": name, "ms": ms, "block_density": blocks})
        print(f"{name:45s} {ms:8.3f} ms" + (f"  blocks {blocks:.3f}" if blocks is not None else ""), flush=True)

    with torch.no_grad(), prefer_fast_dense():
        add("dense cuDNN (SDPA)", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        add("dense FlexAttention", lambda: flex(q, k, v))
        order, inverse, _ = tile_major_order(grid, tile, device)
        add("tile-major gathers (q, k, v, out)", lambda: [t[:, :, order] for t in (q, k, v, q)])
        add(f"tile {list(tile)} as built", lambda: flex(q, k, v, block_mask=tiles), block_density(tiles))
        full_tiles = all_full(tiles)
        add("tile blocks, all full", lambda: flex(q, k, v, block_mask=full_tiles), block_density(full_tiles))
        for opts in ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                     {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                     {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}):
            try:
                add(f"tile as built {opts}", lambda: flex(q, k, v, block_mask=tiles, kernel_options=opts),
                    block_density(tiles))
            except Exception as err:  # noqa: BLE001 - a config the GPU cannot run
                print(f"tile {opts}: {type(err).__name__}: {str(err)[:120]}")
        add(f"1-D band, window size {window_size:g}, over raster order", lambda: flex(q, k, v, block_mask=band),
            block_density(band))
    return rows


def check_config(cfg: DictConfig) -> None:
    if len(cfg.grid) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cfg.grid):
        raise ConfigError(f"grid must be three integers >= 1 (frames, rows, columns), got {list(cfg.grid)}")
    check_int(cfg, "heads", "head_dim", "repeats")
    check_fraction(cfg, "window_size", upper=1)
    require_cuda("window_probe (FlexAttention kernels)")


def window_probe(cfg: DictConfig) -> list[dict]:
    check_config(cfg)
    rows = probe(tuple(cfg.grid), cfg.heads, cfg.head_dim, cfg.window_size, torch.device("cuda"),
                 torch.bfloat16, cfg.repeats)
    save_rows(cfg, rows)
    return rows


main = hydra_app("window_probe", window_probe)

if __name__ == "__main__":
    main()
