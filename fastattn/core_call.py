"""Run a model's own attention processor with its attention core replaced.

A processor fastattn has no q/k/v layout for (the generic adapter's layers) is run whole: its
projections, norms, rotary embedding and output projection are the model's own, and only its one
``scaled_dot_product_attention`` call (diffusers' processors call it directly, or through
``dispatch_attention_fn``'s native backend) is answered by fastattn's attention on the same
[batch, heads, tokens, head_dim] q, k, v. What the replacement cannot stand for is refused in one
line: a mask, dropout, causal or GQA attention, another scale, or not exactly one such call (a
linear-attention layer, another attention backend).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _plain(q: torch.Tensor, k: torch.Tensor, args: dict, tokens: int) -> str | None:
    """Why a call is not plain softmax self-attention over the layer's ``tokens``; None when it is."""
    if q.ndim != 4 or q.shape[-2] != tokens:
        return f"attention over {tuple(q.shape)} for an input of {tokens} tokens (text joined in: joint attention)"
    if args.get("attn_mask") is not None or args.get("is_causal") or args.get("dropout_p"):
        return "a masked, causal or dropout attention call"
    if q.shape != k.shape:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ (cross, joint or GQA attention)"
    scale = args.get("scale")
    if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
        return f"an attention scale of {scale}"
    return None


class CoreAttention(TorchFunctionMode):
    """``with CoreAttention(attend, layer): inner(...)``: the processor's one
    scaled_dot_product_attention call returns ``attend(q, k, v)``."""

    def __init__(self, attend: Callable, layer: int, tokens: int):
        super().__init__()
        self.attend, self.layer, self.tokens, self.calls = attend, layer, tokens, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
        q, k, v = named["query"], named["key"], named["value"]
        why = _plain(q, k, named, self.tokens)
        self.calls += 1
        if why is None and self.calls > 1:
            why = "more than one attention call"
        if why is not None:
            raise ValueError(f"layer {self.layer}: its processor makes {why}; layer-wise techniques replace one "
                             "plain self-attention")
        return self.attend(q, k, v)

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.calls != 1:
            raise ValueError(f"layer {self.layer}: its processor made no scaled_dot_product_attention call (linear "
                             "attention, or an attention backend other than 'native'); layer-wise techniques cannot "
                             "replace its attention")


__all__ = ["CoreAttention"]
