"""Run a model's own attention processor with its attention core replaced.

A processor fastattn has no q/k/v layout for (the generic adapter's layers) is run whole: its
projections, norms, rotary embedding and output projection are the model's own, and only its one
``scaled_dot_product_attention`` call (diffusers' processors call it directly, or through
``dispatch_attention_fn``'s native backend) is answered by fastattn's attention on the same
[batch, heads, tokens, head_dim] q, k, v, mask and causality. Another scale is folded into q and
grouped k/v heads are repeated, so the replacement sees plain attention; a dropout call, or no such
call at all (a linear-attention layer, another attention backend), is refused in one line.

Where the sequence holds text as well as image tokens (joint attention, or a processor that joins
the text in), :func:`text_rows` finds the text's rows by running the processor once with NaN text
(its attention calls answered with zeros): every projection, norm and rotary embedding acts per
token, so the NaN rows of q and k are exactly the text's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# torch's own function, as a mode receives it: F.scaled_dot_product_attention may be a router in
# its place (fastattn.kernels.fa4.route_sdpa), which hands calls on to it while a mode is active
SDPA = torch._C._nn.scaled_dot_product_attention


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """A scaled_dot_product_attention call's arguments, each by its name (query, key, value, ...)."""
    return {**dict(zip(_SDPA_ARGS, args)), **kwargs}


@dataclass
class Core:
    """One attention call as the replacement answers it: q, k, v [batch, heads, tokens, head_dim]
    with the default scale and as many k/v heads as q heads, and the call's mask (None, boolean
    or additive, broadcastable to [batch, heads, tokens, tokens])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool = False  # the call's is_causal (a query sees keys up to its own position)


def _core(named: dict, layer: int) -> Core:
    q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"layer {layer}: attention over {tuple(q.shape)}; the replacement takes "
                         "[batch, heads, tokens, head_dim]")
    if named.get("dropout_p"):
        raise ValueError(f"layer {layer}: its processor makes a dropout attention call; layer-wise techniques "
                         "replace deterministic attention only")
    scale = named.get("scale")
    if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernels' default scale then gives the call's
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
        mask = None  # a padding mask with nothing padded
    return Core(q, k, v, mask, bool(named.get("is_causal")))


class CoreAttention(TorchFunctionMode):
    """``with CoreAttention(attend, layer): inner(...)``: each attention call of the processor
    returns ``attend(core, index)`` (a :class:`Core`; ``index`` counts the calls from 0). Most
    processors make one; some attend sample by sample (Mochi's: each sample's own valid text) or
    segment by segment (Qwen-Image 2.1's text segments, then the image)."""

    def __init__(self, attend: Callable[[Core, int], torch.Tensor], layer: int):
        super().__init__()
        self.attend, self.layer, self.calls = attend, layer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        core = _core(sdpa_arguments(args, kwargs), self.layer)
        index, self.calls = self.calls, self.calls + 1
        return self.attend(core, index).to(core.v.dtype)

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.calls == 0:
            raise ValueError(f"layer {self.layer}: its processor made no scaled_dot_product_attention call (linear "
                             "attention, or an attention backend other than 'native'); layer-wise techniques cannot "
                             "replace its attention")


def _nan_tokens(t: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, dim] -> which tokens hold a NaN, on the host (the layer's calls read
    them without a device sync)."""
    return t.isnan().any(dim=-1).any(dim=1).any(dim=0).cpu()


class _Capture(TorchFunctionMode):
    """Records which query and key tokens of every attention call hold a NaN, answering each
    call with zeros (only the token vectors are kept, not the calls' q and k)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        named = sdpa_arguments(args, kwargs)
        q = named["query"]
        self.calls.append((_nan_tokens(q), _nan_tokens(named["key"])))
        return torch.zeros_like(q[..., :1]).expand(*q.shape[:-1], named["value"].shape[-1])


def text_rows(run: Callable[[torch.Tensor], object], text: torch.Tensor,
              layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which query and which key tokens of each of the layer's attention calls are text: a pair
    of boolean vectors per call (the same where q and k cover one sequence; keys may hold text
    the queries do not).

    ``run(text)`` calls the layer's processor with ``text`` as its encoder hidden states; it is
    run once with NaN text, every attention call answered with zeros."""
    capture = _Capture()
    with torch.no_grad(), capture:
        run(torch.full_like(text, float("nan")))
    if not capture.calls:
        raise ValueError(f"layer {layer}: its processor made no scaled_dot_product_attention call; layer-wise "
                         "techniques cannot replace its attention")
    rows = capture.calls
    if any(bool(q.all()) and bool(k.all()) for q, k in rows):
        raise ValueError(f"layer {layer}: its text reaches every token before attention; its image tokens cannot be "
                         "told apart")
    return rows


def image_span(rows: torch.Tensor) -> tuple[int, int] | None:
    """(first image token, image tokens) of a sequence whose text rows are ``rows``; None where
    the image tokens are not one run (a context-parallel gather puts each rank's text before its
    image shard)."""
    image = (~rows).nonzero().flatten()
    start, count = int(image[0]), int(image.numel())
    return (start, count) if int(image[-1]) - start + 1 == count else None


def image_spans(rows: tuple[torch.Tensor, torch.Tensor], layer: int):
    """The image spans of the queries and the keys (:func:`text_rows`), the same image count;
    either is None where its image tokens are not one run."""
    if int((~rows[0]).sum()) != int((~rows[1]).sum()):
        raise ValueError(f"layer {layer}: {int((~rows[0]).sum())} image queries attend to {int((~rows[1]).sum())} "
                         "image keys; the window pairs each image query with the image keys")
    return image_span(rows[0]), image_span(rows[1])


__all__ = ["SDPA", "Core", "sdpa_arguments", "CoreAttention", "image_span", "image_spans", "text_rows"]
