"""Attention kernels: dense, 1-D band and 2-D tile windows, and the WA-RS refresh (FlashAttention-4
on SM90/SM100 where it imports, see :mod:`.fa4`). Which backend runs a call is decided in one
place, :mod:`.dispatch` (``attention_backend`` names one for a block)."""

from .attention import (
    WINDOW_BACKENDS,
    get_window_backend,
    masked_window_attention,
    refresh_attention,
    set_window_backend,
    tile_attention,
    window_attention,
)
from .arrow import arrow_attention
from .dense import dense_attention, prefer_fast_dense
from .dispatch import attention_backend
from .fa4 import fa4_mode, get_fa4, set_fa4
from .flex import flex_available
from .masks import band_mask_mod, band_pairs, dense_mask, tile_mask_mod, tile_radius, window_half_width

__all__ = [
    "WINDOW_BACKENDS",
    "arrow_attention",
    "attention_backend",
    "band_mask_mod",
    "band_pairs",
    "dense_attention",
    "dense_mask",
    "fa4_mode",
    "flex_available",
    "get_fa4",
    "get_window_backend",
    "masked_window_attention",
    "prefer_fast_dense",
    "refresh_attention",
    "set_fa4",
    "set_window_backend",
    "tile_attention",
    "tile_mask_mod",
    "tile_radius",
    "window_attention",
    "window_half_width",
]
