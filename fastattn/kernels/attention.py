"""Attention entry points used by the processor: dense, windowed, and the WA-RS refresh.

All take and return [batch, heads, seq, head_dim]. The CPU path is a masked SDPA that is
exact but does dense work; on CUDA the band runs block-sparse through FlexAttention so the
FLOPs saved by the window become time saved.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .masks import band_mask_mod, dense_mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Same call as diffusers' AttnProcessor2_0, so a refresh step reproduces the model's output.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


@functools.lru_cache(maxsize=32)
def _band_bool_mask(seq_len: int, half_width: int, device: torch.device) -> torch.Tensor:
    return dense_mask(band_mask_mod(half_width), seq_len, seq_len, device=device)


def _flex_available(q: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


@functools.lru_cache(maxsize=32)
def _band_block_mask(seq_len: int, half_width: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(band_mask_mod(half_width), None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half_width: int) -> torch.Tensor:
    """Attention restricted to keys with |q_idx - k_idx| <= half_width."""
    seq_len = q.shape[-2]
    if half_width >= seq_len - 1:
        return dense_attention(q, k, v)
    if _flex_available(q):
        block_mask = _band_block_mask(seq_len, half_width, q.device)
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    mask = _band_bool_mask(seq_len, half_width, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def full_and_window_attention(q, k, v, half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The WA-RS refresh step needs both the full output O and the window output W."""
    return dense_attention(q, k, v), window_attention(q, k, v, half_width)
