"""Dense attention: the one call every full path makes (FlashAttention-4 where :mod:`.fa4` says
so, else SDPA; :func:`.dispatch.choose` decides), and the kernel preference for the model's own SDPA calls."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import fa4
from .dispatch import choose


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if choose(q, "dense", v) == "fa4":
        return fa4.dense(q, k, v)
    # The call diffusers' processors make (AttnProcessor2_0, the joint processors), so a full
    # head or a refresh step reproduces the model's own output.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


@contextlib.contextmanager
def prefer_fast_dense():
    """The fastest dense kernel for the model's own attention calls inside the block, so the raw
    model and a compressed model's full layers run on the same kernel as :func:`dense_attention`:
    mask-free SDPA calls go to FlashAttention-4 where :mod:`.fa4` is enabled
    (:func:`.fa4.route_sdpa`), and SDPA itself tries cuDNN > flash > efficient > math (CUDA only)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        ctx = sdpa_kernel(order, set_priority=True)
    except (ImportError, TypeError, AttributeError):  # older torch: keep its default order
        ctx = contextlib.nullcontext()
    with ctx, fa4.route_sdpa():
        yield
