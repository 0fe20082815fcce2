"""Kernel entry points as single ``torch.compile`` graph nodes (``torch.library`` custom ops).

The windowed kernels choose a backend per call, build and cache masks in Python, and launch
FlexAttention, Triton or FlashAttention-4 kernels: dynamo would break the graph at several of
these places. Under compile each entry point is one custom op instead, whose implementation is
the eager entry point itself and whose fake (meta) implementation only says the output shapes.

The fake implementation cannot know which backend the call will take, and the backends lay their
outputs out differently (SDPA and FA4 as ``[batch, seq, heads, dim]`` memory, FlexAttention
contiguous), so the op promises the layout of ``torch.empty_like(q)`` and copies only where the
kernel's output has another one.
"""

from __future__ import annotations

from typing import Callable

import torch


def _laid_out_as(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if out.stride() == torch.empty_like(q, device="meta").stride():
        return out
    return torch.empty_like(q).copy_(out)


def opaque_kernel(name: str, eager: Callable, schema: str):
    """Register ``fastattn::<name>`` running ``eager`` (called with the op's arguments; it returns
    a tensor or a tuple of tensors of q's shape) and return the op."""
    n_out = schema.rsplit("->", 1)[1].count("Tensor")

    def run(q, *args):
        result = eager(q, *args)
        if n_out == 1:
            return _laid_out_as(q, result)
        return tuple(_laid_out_as(q, r) for r in result)

    def fake(q, *args):
        return torch.empty_like(q) if n_out == 1 else tuple(torch.empty_like(q) for _ in range(n_out))

    op = torch.library.custom_op(f"fastattn::{name}", run, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


__all__ = ["opaque_kernel"]
