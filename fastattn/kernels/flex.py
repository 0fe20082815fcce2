"""The one FlexAttention helper of the kernels: availability, and the compiled call.

Every windowed kernel (1-D band, 2-D tile, 3-D video tile, head-wise arrow) runs through
:func:`flex_attention_call`, so there is one compiled ``flex_attention`` per process and one
place that lifts dynamo's recompile limit.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import Backend, register

# Inductor's FlexAttention lowering refuses smaller head dims (tiny test models have 8).
FLEX_MIN_HEAD_DIM = 16


def flex_available(q: torch.Tensor) -> bool:
    """FlexAttention's block-sparse kernels run on CUDA tensors with torch >= 2.5 and a head dim
    of at least 16; elsewhere the callers use an exact masked SDPA."""
    if not FLEX.fits(q):
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


# Every windowed kind through block masks (the refresh as dense + band).
FLEX = register(Backend("flex", ("window", "refresh", "tile", "video", "arrow"),
                        needs="CUDA, torch >= 2.5 and head_dim >= 16", devices=("cuda",),
                        min_head_dim=FLEX_MIN_HEAD_DIM, usable=lambda q, v, kind: flex_available(q)))


@functools.lru_cache(maxsize=1)
def compiled_flex():
    """``torch.compile(flex_attention)``, built once.

    Every window size and sequence length is its own compiled kernel; past dynamo's default
    recompile limit (8) flex_attention would silently fall back to eager dense math, which
    materialises the whole L x L score matrix, so the limit is raised first.
    """
    from torch.nn.attention.flex_attention import flex_attention

    from ..utils.dynamo import allow_recompiles

    allow_recompiles(256)
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_call(q, k, v, block_mask, kernel_options=None, compiled: bool = True) -> torch.Tensor:
    """Block-sparse attention of [batch, heads, seq, head_dim] tensors under ``block_mask``.
    ``compiled=False`` runs the eager reference implementation (tests, diagnostics)."""
    if compiled:
        return compiled_flex()(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
