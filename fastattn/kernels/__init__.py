"""Attention kernels: dense, 1-D band window, and the WA-RS refresh pair."""

from .attention import dense_attention, full_and_window_attention, window_attention
from .masks import band_mask_mod, band_pairs, dense_mask, window_half_width

__all__ = [
    "band_mask_mod",
    "band_pairs",
    "dense_attention",
    "dense_mask",
    "full_and_window_attention",
    "window_attention",
    "window_half_width",
]
