"""Windows in video geometry, for full 3-D attention over a (frames, rows, cols) token grid.

Spatial attention (one frame's tokens) and temporal attention (one location's frames) are 1-D
sequences already, so their window is the 1-D band of :mod:`.masks` over that sequence: a band
over a frame's raster tokens, or a band over frames. Full 3-D attention (Wan) sees every token
of the video in one sequence, raster order (frame, row, col); its window is a *tile
neighbourhood*: the grid is cut into tiles, and a query attends the keys whose tile is within
``radius`` tiles of its own along every axis. Tile sizes are chosen so the neighbourhood covers
about 2 x ``window_size`` of the grid, as the 1-D band of that window size covers 2 x
``window_size`` of a sequence (``window_size`` of the tokens on each side).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import fa4
from .dense import dense_attention
from .dispatch import choose
from .flex import flex_attention_call
from .masks import dense_mask

Grid = tuple[int, int, int]  # (frames, rows, cols) of tokens


def check_grid(grid, seq_len: int | None = None) -> Grid:
    if len(grid) != 3 or any(int(n) < 1 for n in grid):
        raise ValueError(f"token grid must be three positive sizes (frames, rows, cols), got {tuple(grid)}")
    grid = tuple(int(n) for n in grid)
    if seq_len is not None and math.prod(grid) != seq_len:
        raise ValueError(f"token grid {grid} has {math.prod(grid)} tokens but the sequence has {seq_len}")
    return grid


def tile_shape(grid: Grid, window_size: float, radius: int = 1) -> Grid:
    """Tile sizes whose (2·radius+1)³-tile neighbourhood spans 2 x ``window_size`` of the grid:
    each axis gets the cube root of that share. A share of 1 or more is one tile (full)."""
    if not 0 < window_size <= 1:
        raise ValueError(f"window_size must be in (0, 1], got {window_size}")
    if radius < 0:
        raise ValueError(f"tile radius must be >= 0, got {radius}")
    share = 2 * window_size
    if share >= 1:
        return tuple(grid)
    per_axis = share ** (1 / 3)
    return tuple(min(n, max(1, math.ceil(n * per_axis / (2 * radius + 1)))) for n in grid)


def tile_neighbourhood_mask_mod(grid: Grid, tile: Grid, radius: int = 1):
    """mask_mod keeping keys whose tile is within ``radius`` tiles of the query's, per axis."""
    _, rows, cols = grid
    tf, th, tw = tile
    per_frame = rows * cols

    def keep(b, h, q_idx, kv_idx):
        def tiles(idx):
            return idx // per_frame // tf, idx % per_frame // cols // th, idx % cols // tw

        qf, qh, qw = tiles(q_idx)
        kf, kh, kw = tiles(kv_idx)
        return ((qf - kf).abs() <= radius) & ((qh - kh).abs() <= radius) & ((qw - kw).abs() <= radius)

    return keep


def shard_tile_mask_mod(query_start: int, key_start: int, grid: Grid, tile: Grid, radius: int = 1):
    """:func:`tile_neighbourhood_mask_mod` of one shard's queries against a run of keys, their raster
    positions counted from ``query_start`` and ``key_start`` in the whole grid."""
    keep = tile_neighbourhood_mask_mod(grid, tile, radius)
    return lambda b, h, q_idx, kv_idx: keep(b, h, query_start + q_idx, key_start + kv_idx)


def tile_key_range(grid: Grid, tile: Grid, radius: int, first: int, last: int) -> tuple[int, int]:
    """The raster positions a neighbourhood can reach from queries ``first``..``last``: the frames
    of the frame tiles within ``radius`` of theirs (rows and columns span every frame)."""
    per_frame = grid[1] * grid[2]
    low, high = first // per_frame // tile[0] - radius, last // per_frame // tile[0] + radius
    return max(0, low * tile[0] * per_frame), min(math.prod(grid), (high + 1) * tile[0] * per_frame) - 1


def tile_pairs(grid: Grid, tile: Grid, radius: int = 1) -> int:
    """(query, key) pairs inside the neighbourhood; it factorises over the three axes."""
    total = 1
    for n, t in zip(grid, tile):
        idx = torch.arange(n) // t
        total *= int(((idx[:, None] - idx[None, :]).abs() <= radius).sum())
    return total


@functools.lru_cache(maxsize=16)
def _tile_bool_mask(grid: Grid, tile: Grid, radius: int, device: torch.device) -> torch.Tensor:
    n = math.prod(grid)
    return dense_mask(tile_neighbourhood_mask_mod(grid, tile, radius), n, n, device=device)


@functools.lru_cache(maxsize=16)
def tile_major_order(grid: Grid, tile: Grid, device: torch.device):
    """(order, inverse, tile coordinates in that order): tokens sorted tile by tile, so a tile's
    tokens are contiguous and FlexAttention's 128-token blocks hold few tiles each. In raster
    order a block spans whole rows and the neighbourhood's column limit saves no block."""
    f, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    tiles = torch.stack([f // tile[0], h // tile[1], w // tile[2]], -1).reshape(-1, 3)
    key = ((tiles[:, 0] * grid[1] + tiles[:, 1]) * grid[2] + tiles[:, 2]) * math.prod(grid) + torch.arange(len(tiles))
    order = torch.argsort(key)
    return order.to(device), torch.argsort(order).to(device), tiles[order].to(device)


@functools.lru_cache(maxsize=16)
def tile_block_mask(grid: Grid, tile: Grid, radius: int, device: torch.device, compile_mask: bool = True):
    """FlexAttention BlockMask of the neighbourhood over tokens in :func:`tile_major_order`."""
    from torch.nn.attention.flex_attention import create_block_mask

    _, _, coords = tile_major_order(grid, tile, device)
    tf, th, tw = (c.contiguous() for c in coords.unbind(1))

    def keep(b, h, q_idx, kv_idx):
        return (((tf[q_idx] - tf[kv_idx]).abs() <= radius) & ((th[q_idx] - th[kv_idx]).abs() <= radius)
                & ((tw[q_idx] - tw[kv_idx]).abs() <= radius))

    n = math.prod(grid)
    # Compiled construction works block by block; eager would materialise [n, n] intermediates.
    return create_block_mask(keep, None, None, n, n, device=device, _compile=compile_mask)


@functools.lru_cache(maxsize=16)
def _tile_coordinates(grid: Grid, tile: Grid, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each tile-major token's tile index along the three axes, int32 (FA4's mask reads them)."""
    coords = tile_major_order(grid, tile, device)[2]
    return tuple(c.to(torch.int32).contiguous() for c in coords.unbind(1))


def sparse_tile_window_attention(q, k, v, grid: Grid, tile: Grid, radius: int = 1, compiled: bool = True,
                                 use_fa4: bool | None = None):
    """The tile window as block-sparse attention over tile-major tokens, back in raster order:
    FA4 (SM90) with FlexAttention's block mask and the neighbourhood per element in partial
    blocks, else FlexAttention."""
    order, inverse, _ = tile_major_order(grid, tile, q.device)
    block_mask = tile_block_mask(grid, tile, radius, q.device, compiled)
    qs, ks, vs = q[:, :, order], k[:, :, order], v[:, :, order]
    if choose(q, "video") == "fa4" if use_fa4 is None else use_fa4:
        mask = fa4.Mask("video", (radius,), _tile_coordinates(grid, tile, q.device))
        o = fa4.sparse(qs, ks, vs, fa4.blocks_from_block_mask(block_mask), mask)
    else:
        o = flex_attention_call(qs, ks, vs, block_mask, compiled=compiled)
    return o[:, :, inverse]


def tile_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid,
                          window_size: float, radius: int = 1) -> torch.Tensor:
    """Attention of [batch, heads, seq, head_dim] tensors restricted to the tile neighbourhood.
    CUDA: block-sparse FA4 or FlexAttention (head dim >= 16); elsewhere an exact masked SDPA (dense work)."""
    grid = check_grid(grid, q.shape[-2])
    tile = tile_shape(grid, window_size, radius)
    if all(math.ceil(n / t) - 1 <= radius for n, t in zip(grid, tile)):
        return dense_attention(q, k, v)  # every key is a neighbour
    backend = choose(q, "video")
    if backend != "sdpa":
        return sparse_tile_window_attention(q, k, v, grid, tile, radius, use_fa4=backend == "fa4")
    mask = _tile_bool_mask(grid, tile, radius, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
