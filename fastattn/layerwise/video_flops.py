"""Attention FLOPs of a plan on a video model, each layer counted in its own geometry.

:meth:`LayerPlan.attention_flops` counts one sequence length for every layer. A Latte
spatial layer runs batch·frames sequences of a frame's tokens and a temporal layer
batch·tokens sequences of frames; a Wan layer one sequence of every token, with the plan's 1-D
band over it or a 3-D tile window. This module counts each layer with its own sequences and window pairs, with the same
conventions as :mod:`fastattn.flops` (whole attention module, per CFG pair of samples).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..flops import ZERO, LayerCost, core_flops, projection_flops
from ..kernels.masks import band_pairs, window_half_width
from ..kernels.video_masks import tile_pairs, tile_shape
from .methods import Method
from .plan import LayerPlan


@dataclass(frozen=True)
class VideoShape:
    frames: int  # latent frames after patching
    rows: int
    cols: int
    heads: int
    head_dim: int
    model_dim: int

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.cols


def layer_geometry(kind: str, shape: VideoShape) -> tuple[int, int]:
    """(sequences per sample, tokens per sequence) of one layer of this kind."""
    per_frame = shape.rows * shape.cols
    if kind == "spatial":
        return shape.frames, per_frame
    if kind == "temporal":
        return per_frame, shape.frames
    if kind == "full3d":
        return 1, shape.tokens
    raise ValueError(f"attention kind: unknown {kind!r} (known: spatial, temporal, full3d)")


@functools.lru_cache(maxsize=256)  # plans ask for the same few (kind, shape, fraction) many times
def window_pairs(kind: str, shape: VideoShape, window_size: float, window_shape: str = "band") -> int:
    """(query, key) pairs per sequence inside the kind's window (``window_shape`` chooses between
    the band and the 3-D tile on full 3-D attention; spatial and temporal layers use the band)."""
    if kind == "full3d" and window_shape == "tile":
        grid = (shape.frames, shape.rows, shape.cols)
        return tile_pairs(grid, tile_shape(grid, window_size))
    _, n = layer_geometry(kind, shape)
    return band_pairs(n, window_half_width(n, window_size))


def layer_cost(method: Method, refresh: bool, kind: str, shape: VideoShape, window_size: float,
               window_shape: str = "band") -> LayerCost:
    """FLOPs of one layer at one step for a CFG pair (2 samples), as :func:`fastattn.layerwise.flops.method_cost`."""
    if not method.computes:
        return ZERO
    seqs, n = layer_geometry(kind, shape)
    batch = 2 * seqs
    proj = projection_flops(batch, n, shape.model_dim, shape.heads * shape.head_dim)
    dense = core_flops(batch, shape.heads, shape.head_dim, n * n)
    window = core_flops(batch, shape.heads, shape.head_dim, window_pairs(kind, shape, window_size, window_shape))
    if method is Method.FULL:
        return LayerCost(proj, dense + (window if refresh else 0.0))
    cost = LayerCost(proj, window if method.uses_window else dense)
    return cost.scaled(0.5) if method.shares_cfg else cost


def video_attention_flops(plan: LayerPlan, kinds: list[str], shape: VideoShape) -> dict:
    """``fraction`` (whole attention module) and ``core_fraction`` of the plan against all-full."""
    if len(kinds) != plan.num_layers:
        raise ValueError(f"kinds has {len(kinds)} layers but the plan has {plan.num_layers}")
    refresh = plan.refresh_mask()
    total = raw = ZERO
    for s, row in enumerate(plan.methods):
        for l, m in enumerate(row):
            total = total + layer_cost(m, refresh[s][l], kinds[l], shape, plan.window_size, plan.window_shape)
            raw = raw + layer_cost(Method.FULL, False, kinds[l], shape, plan.window_size, plan.window_shape)
    return {"fraction": total.total / raw.total, "core_fraction": total.core / raw.core,
            "raw_flops_per_pair": raw.total, "flops_per_pair": total.total}
