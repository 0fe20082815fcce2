"""Dense attention: the one SDPA call every full path makes, and the kernel preference for it."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The call diffusers' processors make (AttnProcessor2_0, the joint processors), so a full
    # head or a refresh step reproduces the model's own output.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


@contextlib.contextmanager
def prefer_fast_dense():
    """SDPA backend priority cuDNN > flash > efficient > math inside the block (CUDA only)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        ctx = sdpa_kernel(order, set_priority=True)
    except (ImportError, TypeError, AttributeError):  # older torch: keep its default order
        ctx = contextlib.nullcontext()
    with ctx:
        yield
