"""Run a model's own attention processor with its attention core replaced.

A processor fastattn has no q/k/v layout for (the generic adapter's layers) is run whole: its
projections, norms, rotary embedding and output projection are the model's own, and only its one
``scaled_dot_product_attention`` call (diffusers' processors call it directly, or through
``dispatch_attention_fn``'s native backend) is answered by fastattn's attention on the same
[batch, heads, tokens, head_dim] q, k, v and mask. Another scale is folded into q and grouped
k/v heads are repeated, so the replacement sees plain attention; a causal or dropout call, or not
exactly one such call (a linear-attention layer, another attention backend), is refused in one line.

Where the sequence holds text as well as image tokens (joint attention, or a processor that joins
the text in), :func:`text_rows` finds the text's rows by running the processor once with NaN text
and stopping it at its attention call: every projection, norm and rotary embedding acts per
token, so the NaN rows of q are exactly the text's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class Core:
    """One attention call as the replacement answers it: q, k, v [batch, heads, tokens, head_dim]
    with the default scale and as many k/v heads as q heads, and the call's mask (None, boolean
    or additive, broadcastable to [batch, heads, tokens, tokens])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None


def _core(named: dict, layer: int) -> Core:
    q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"layer {layer}: attention over {tuple(q.shape)}; the replacement takes "
                         "[batch, heads, tokens, head_dim]")
    if named.get("is_causal") or named.get("dropout_p"):
        raise ValueError(f"layer {layer}: its processor makes a causal or dropout attention call; layer-wise "
                         "techniques replace plain attention only")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"layer {layer}: q over {q.shape[-2]} tokens attends to {k.shape[-2]} (cross attention); "
                         "layer-wise techniques replace self-attention over one sequence")
    scale = named.get("scale")
    if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernels' default scale then gives the call's
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
        mask = None  # a padding mask with nothing padded
    return Core(q, k, v, mask)


class CoreAttention(TorchFunctionMode):
    """``with CoreAttention(attend, layer): inner(...)``: the processor's one
    scaled_dot_product_attention call returns ``attend(core)`` (a :class:`Core`)."""

    def __init__(self, attend: Callable[[Core], torch.Tensor], layer: int):
        super().__init__()
        self.attend, self.layer, self.calls = attend, layer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise ValueError(f"layer {self.layer}: its processor makes more than one attention call; layer-wise "
                             "techniques replace one")
        core = _core({**dict(zip(_SDPA_ARGS, args)), **kwargs}, self.layer)
        return self.attend(core).to(core.v.dtype)

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.calls != 1:
            raise ValueError(f"layer {self.layer}: its processor made no scaled_dot_product_attention call (linear "
                             "attention, or an attention backend other than 'native'); layer-wise techniques cannot "
                             "replace its attention")


class _Stop(Exception):
    """Raised at the probed processor's attention call: nothing after it needs to run."""


class _Capture(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.query: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.query = args[0] if args else kwargs["query"]
        raise _Stop


def text_rows(run: Callable[[torch.Tensor], object], text: torch.Tensor, layer: int) -> torch.Tensor:
    """Which tokens of the layer's attention sequence are text: a [tokens] boolean vector.

    ``run(text)`` calls the layer's processor with ``text`` as its encoder hidden states; it is
    given NaN text (one sample) and stopped at its attention call."""
    capture = _Capture()
    with torch.no_grad():
        try:
            with capture:
                run(torch.full_like(text, float("nan")))
        except _Stop:
            pass
    if capture.query is None:
        raise ValueError(f"layer {layer}: its processor made no scaled_dot_product_attention call; layer-wise "
                         "techniques cannot replace its attention")
    rows = capture.query.isnan().any(dim=-1).any(dim=1).any(dim=0)  # [batch, heads, tokens, dim] -> [tokens]
    if bool(rows.all()):
        raise ValueError(f"layer {layer}: its text reaches every token before attention; its image tokens cannot be "
                         "told apart")
    return rows


def image_span(rows: torch.Tensor, layer: int) -> tuple[int, int]:
    """(first image token, image tokens) of a sequence whose text rows are ``rows``; the image
    tokens must be one run (text before and/or after them)."""
    image = (~rows).nonzero().flatten()
    start, count = int(image[0]), int(image.numel())
    if int(image[-1]) - start + 1 != count:
        raise ValueError(f"layer {layer}: its text tokens sit between image tokens; the window needs the image "
                         "tokens in one run")
    return start, count


__all__ = ["Core", "CoreAttention", "image_span", "text_rows"]
