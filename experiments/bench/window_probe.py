"""What bounds a FlexAttention window kernel at one shape: the window's block mask as built
(partial blocks evaluate the mask per element), the same blocks all treated as full (the cost of
the block count alone), a dense Flex call (Flex's own throughput) and dense cuDNN, plus a few
tile configurations. Used for Wan's 3-D tile window (32,760 tokens, head dim 128).

    python -m experiments.bench.window_probe --grid 21 30 52 --heads 12 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from fastattn.kernels import prefer_fast_dense
from fastattn.kernels.masks import window_half_width
from fastattn.kernels.video_masks import tile_block_mask, tile_major_order, tile_shape

from ..timing import time_ms


def all_full(block_mask):
    """The same non-empty blocks, every one marked full (no per-element mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    dense = block_mask.to_dense().bool()  # [B, H, q blocks, kv blocks]
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    num = dense.sum(-1).to(torch.int32)
    empty = torch.zeros_like(num)
    return BlockMask.from_kv_blocks(empty, order, num, order, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                    seq_lengths=block_mask.seq_lengths)


def probe(grid, heads, head_dim, window_fraction, device, dtype, repeats) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    n = math.prod(grid)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    tile = tile_shape(grid, window_fraction)
    tiles = tile_block_mask(grid, tile, 1, device)
    w = window_half_width(n, window_fraction)
    band = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= w, None, None, n, n, device=device)
    rows = []

    def add(name, fn, blocks=None):
        ms = time_ms(fn, device, 2, repeats)
        rows.append({"kernel": name, "ms": ms, "block_density": blocks})
        print(f"{name:45s} {ms:8.3f} ms" + (f"  blocks {blocks:.3f}" if blocks is not None else ""), flush=True)

    density = lambda bm: 1 - bm.sparsity() / 100  # noqa: E731
    with torch.no_grad(), prefer_fast_dense():
        add("dense cuDNN (SDPA)", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        add("dense FlexAttention", lambda: flex(q, k, v))
        order, inverse, _ = tile_major_order(grid, tile, device)
        add("tile-major gathers (q, k, v, out)", lambda: [t[:, :, order] for t in (q, k, v, q)])
        add(f"tile {list(tile)} as built", lambda: flex(q, k, v, block_mask=tiles), density(tiles))
        full_tiles = all_full(tiles)
        add("tile blocks, all full", lambda: flex(q, k, v, block_mask=full_tiles), density(full_tiles))
        for opts in ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                     {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                     {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}):
            try:
                add(f"tile as built {opts}", lambda: flex(q, k, v, block_mask=tiles, kernel_options=opts),
                    density(tiles))
            except Exception as err:  # noqa: BLE001 - a config the GPU cannot run
                print(f"tile {opts}: {type(err).__name__}: {str(err)[:120]}")
        add(f"1-D band 1/{round(1 / window_fraction)} over raster order", lambda: flex(q, k, v, block_mask=band),
            density(band))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window-fraction", type=float, default=0.125)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("window_probe needs a CUDA device (FlexAttention kernels)")
    rows = probe(tuple(args.grid), args.heads, args.head_dim, args.window_fraction, torch.device("cuda"),
                 torch.bfloat16, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
