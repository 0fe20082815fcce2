"""Attention FLOPs of one self-attention layer under each layer-wise method, against the raw
model, with the conventions of :mod:`fastattn.flops` (whole attention module, per CFG pair)."""

from __future__ import annotations

import math

from ..flops import ZERO, LayerCost, core_flops, projection_flops
from ..kernels.masks import band_pairs, tile_pairs, tile_radius, window_half_width
from .methods import Method


def window_pair_count(seq_len: int, window_size: float, window_shape: str = "band") -> int:
    """(query, key) pairs the window keeps; the tile counts a square latent grid."""
    if window_shape == "band":
        return band_pairs(seq_len, window_half_width(seq_len, window_size))
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"window_shape 'tile' FLOPs need a square token grid, got {seq_len} tokens")
    return tile_pairs(side, side, tile_radius(seq_len, window_size))


def method_cost(
    method: Method,
    *,
    refresh: bool,
    seq_len: int,
    heads: int,
    head_dim: int,
    model_dim: int | None = None,
    window_size: float = 0.125,
    window_shape: str = "band",
) -> LayerCost:
    """FLOPs of one layer at one step for a CFG pair (batch 2).

    full: projections + L^2 products; a refresh step adds the window products.
    wars: projections + band products. ast and forecast: nothing (forecast's extrapolation is an
    element-wise op on the layer's output, no attention). asc and wars+asc: half the batch (an asc
    refresh adds the window products of that half).
    """
    inner = heads * head_dim
    model_dim = model_dim or inner
    dense_pairs = seq_len * seq_len
    window_pairs = window_pair_count(seq_len, window_size, window_shape)
    proj = projection_flops(2, seq_len, model_dim, inner)
    if not method.computes:
        return ZERO
    if method is Method.FULL:
        core = core_flops(2, heads, head_dim, dense_pairs)
        if refresh:
            core += core_flops(2, heads, head_dim, window_pairs)
        return LayerCost(proj, core)
    pairs = window_pairs if method.uses_window else dense_pairs
    if refresh and method is Method.ASC:
        pairs += window_pairs
    cost = LayerCost(proj, core_flops(2, heads, head_dim, pairs))
    return cost.scaled(0.5) if method.shares_cfg else cost
