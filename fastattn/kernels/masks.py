"""Sparsity patterns as pure index functions, and the window size they are built from.

The functions follow FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` convention so the same
definition drives the CPU fallback (a dense boolean mask) and block-sparse GPU kernels.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch


@torch.compiler.assume_constant_result  # exact rational arithmetic on constants: run at trace time
def window_half_width(seq_len: int, window_size: float | str) -> int:
    """Half-width w of the 1-D band |q - k| <= w when a query sees ``window_size`` of the
    ``seq_len`` tokens on each side: w = ceil(window_size * seq_len), flash-attn's
    ``window_size=(w, w)``. DiTFastAttn's "window size 1/8 of the tokens" is 0.125.

    A window size of 1 covers every key for every query (w = seq_len - 1). The product is
    taken in exact rational arithmetic on the decimal the size was written as (its ``repr``),
    so 0.07 of 100 tokens is a half-width of exactly 7 (in floating point 0.07 * 100 rounds up
    to 8). Compiled processors pass that decimal itself (:attr:`StepState.window_decimal`): a
    string stays a compile-time constant where a float that changed would turn symbolic.
    """
    return _half_width(int(seq_len), window_size if isinstance(window_size, str) else repr(float(window_size)))


@functools.lru_cache(maxsize=None)  # every attention call asks again for the same few lengths
def _half_width(seq_len: int, decimal: str) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    try:
        size = Fraction(decimal)
    except ValueError:  # nan, inf
        size = None
    if size is None or not 0 < size <= 1:
        raise ValueError(f"window_size must be in (0, 1], got {decimal}")
    return min(seq_len - 1, math.ceil(size * seq_len))


def band_mask_mod(half_width: int):
    """mask_mod keeping keys within ``half_width`` positions of the query."""

    def keep(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= half_width

    return keep


def shard_band_mask_mod(text_keys: int, query_start: int, key_start: int, tile: int, radius: int):
    """mask_mod of one shard's image queries against ``text_keys`` text keys, then image keys: the
    text kept, image pairs kept where their tiles (``tile`` tokens from position 0; 1: the token
    band) are at most ``radius`` apart, positions counted from ``query_start`` and ``key_start``
    (where the queries and the first image key sit in the whole image sequence)."""

    def keep(b, h, q_idx, kv_idx):
        image_k = kv_idx - text_keys
        apart = (torch.div(query_start + q_idx, tile, rounding_mode="floor")
                 - torch.div(key_start + image_k, tile, rounding_mode="floor")).abs()
        return (image_k < 0) | (apart <= radius)

    return keep


def dense_mask(mask_mod, q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Materialise a mask_mod as a boolean [q_len, kv_len] tensor (True = attend)."""
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, q, k)


def band_pairs(seq_len: int, half_width: int) -> int:
    """Number of (query, key) pairs inside the band: the window's share of the L x L matrix."""
    w = min(half_width, seq_len - 1)
    return seq_len * (2 * w + 1) - w * (w + 1)


@torch.compiler.assume_constant_result
def tile_radius(seq_len: int, window_size: float | str) -> int:
    """Radius r of the (2r+1)^2 square neighbourhood with about as many keys per query as the
    1-D band of the same ``window_size`` (2w+1 keys)."""
    keys = 2 * window_half_width(seq_len, window_size) + 1
    return max(0, round((math.sqrt(keys) - 1) / 2))


def tile_mask_mod(radius: int, grid_width: int):
    """mask_mod keeping keys within ``radius`` rows and columns of the query in a row-major
    latent grid of ``grid_width`` columns."""

    def keep(b, h, q_idx, kv_idx):
        row_near = (q_idx // grid_width - kv_idx // grid_width).abs() <= radius
        col_near = (q_idx % grid_width - kv_idx % grid_width).abs() <= radius
        return row_near & col_near

    return keep


def tile_pairs(grid_height: int, grid_width: int, radius: int) -> int:
    """(query, key) pairs inside the square neighbourhoods: separable into rows times columns."""
    return band_pairs(grid_height, radius) * band_pairs(grid_width, radius)
