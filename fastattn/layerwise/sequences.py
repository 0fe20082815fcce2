"""Where a layer run through its own processor has its image tokens, and its window over them.

A layer-wise processor that runs the model's own processor (the ``WRAPPED`` layers: joint,
single-stream and generic ones, :mod:`fastattn.core_call`) answers each attention call with a
:class:`~fastattn.core_call.Core`. The call's sequence may hold text as well as image tokens, in
the queries, the keys or both: :func:`call_spans` says which tokens are the image's (from the text
rows the processor's probe found, else from the call's image token count), and
:func:`sequence_window` computes the window over them, every pair with a text token kept in full
(DiTFastAttnV2's arrow at layer granularity). The helpers below handle what such a layer returns
(a joint layer's (image, text) streams) and the halves of a CFG batch.
"""

from __future__ import annotations

import torch

from ..core_call import Core, image_spans
from ..kernels import arrow_attention, dense_attention, masked_window_attention
from ..kernels.masks import window_half_width

WHOLE = "whole"  # an attention call with no image-image pairs: the window keeps all of it


class Reordered:
    """Text and image tokens that are not each one run (a context-parallel gather: each rank's
    text, then its image shard, rank after rank): the window runs on the tokens reordered text
    first, image tokens in their order, and the output is put back in the call's order."""

    def __init__(self, q_text: torch.Tensor, k_text: torch.Tensor):
        self.q_order, self.k_order = (torch.cat([t.nonzero().flatten(), (~t).nonzero().flatten()])
                                      for t in (q_text, k_text))
        self.spans = ((int(q_text.sum()), int((~q_text).sum())), (int(k_text.sum()), int((~k_text).sum())))

    def reorder(self, core: Core) -> Core:
        if core.causal:
            raise ValueError("a causal attention call whose image tokens are not one run: reordering them would "
                             "change what each query sees")
        if self.q_order.device != core.q.device:  # moved once; the processor keeps this layout per call shape
            self.q_order, self.k_order = self.q_order.to(core.q.device), self.k_order.to(core.q.device)
        q_order, k_order = self.q_order, self.k_order
        mask = core.mask
        if mask is not None:
            mask = mask.index_select(-1, k_order) if mask.shape[-1] > 1 else mask
            mask = mask.index_select(-2, q_order) if mask.shape[-2] > 1 else mask
        return Core(core.q.index_select(-2, q_order), core.k.index_select(-2, k_order),
                    core.v.index_select(-2, k_order), mask)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(out).index_copy_(-2, self.q_order, out)


def call_spans(core: Core, layer_tokens: int, rows, image: int | None, text_first: bool | None, layer: int):
    """(first image token, image tokens) among the call's queries and among its keys; None
    where both are the same all-image sequence, :data:`WHOLE` where the call holds no image-image
    pairs (the arrow keeps all of it). From the text ``rows`` where the layer was given its text;
    else the call's ``image`` token count, with any other tokens (a single-stream layer's text)
    placed where the model's joint layers put theirs (``text_first``). ``layer_tokens``: the
    layer input's token count."""
    q_len, k_len = core.q.shape[-2], core.k.shape[-2]
    if rows is not None:
        if bool(rows[0].all()) or bool(rows[1].all()):
            return WHOLE  # only text queries or only text keys
        if rows[0].numel() == q_len and rows[1].numel() == k_len:
            spans = image_spans(rows, layer)
            return spans if None not in spans else Reordered(*rows)
        # another share of the text than the probe's (Mochi's valid tokens per sample): the
        # layer's image tokens, the text on the side the probe showed
        first = bool(rows[1][0])
        return tuple((n - layer_tokens, layer_tokens) if first else (0, layer_tokens) for n in (q_len, k_len))
    if q_len != k_len:
        if image is not None and image != q_len and q_len < k_len:
            return WHOLE  # queries that are not the image's (Qwen-Image 2.1's text segments)
        if q_len > k_len or (image is not None and image != q_len):
            raise ValueError(f"layer {layer}: q over {q_len} tokens attends to {k_len} (cross attention) and the "
                             "layer is given no text to tell them apart; layer-wise techniques replace self-attention")
        # more keys than queries: a prefix (cached or understanding tokens: Qwen-Image 2.1, Cosmos 3)
        # before the queries' own keys
        return (0, q_len), (k_len - q_len, q_len)
    if image is None or image >= q_len or q_len != layer_tokens:
        return None
    span = (q_len - image, image) if text_first else (0, image)
    return span, span


def sequence_window(core: Core, spans, window_shape: str, window_decimal: str, layer: int) -> torch.Tensor:
    """The band window of a call with a padding or causal mask or with text: over the image
    tokens, every pair with a text token kept (the arrow, :mod:`fastattn.kernels.arrow`); one
    masked SDPA call where the mask, causality or differing queries and keys need it."""
    if window_shape != "band":
        raise ValueError(f"layer {layer}: the {window_shape!r} window needs an image-only, unmasked sequence; this "
                         "layer's holds text or a mask (use window_shape='band')")
    if isinstance(spans, Reordered):
        return spans.restore(sequence_window(spans.reorder(core), spans.spans, window_shape, window_decimal, layer))
    image_len = spans[0][1] if spans is not None else core.q.shape[-2]
    half_width = window_half_width(image_len, window_decimal)
    if core.mask is None and not core.causal and spans is not None and spans[0] == spans[1] \
            and core.q.shape == core.k.shape:
        return arrow_attention(core.q, core.k, core.v, [half_width] * core.q.shape[1], *spans[0])
    q_span, k_span = spans if spans is not None else (None, None)
    return masked_window_attention(core.q, core.k, core.v, half_width, core.mask, q_span, k_span, core.causal)


def full_attention(core: Core) -> torch.Tensor:
    """Full attention of a call: the model's own masked or causal SDPA call where it has either."""
    if core.mask is None and not core.causal:
        return dense_attention(core.q, core.k, core.v)
    return torch.nn.functional.scaled_dot_product_attention(core.q, core.k, core.v, attn_mask=core.mask,
                                                            is_causal=core.causal)


def half_of(value, half: slice, batch: int):
    """``value`` (a tensor, or a tuple / list of them: rotary cos and sin) cut to ``half`` of the
    batch where its first dimension is the batch; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value[half] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(half_of(v, half, batch) for v in value)
    return value


def both_halves(residual):
    """An ASC refresh's residual of the conditional half, for both halves of the CFG batch (one
    per attention call where the processor makes several)."""
    if isinstance(residual, tuple):
        per_sample = all(r.shape[0] == 1 for r in residual if r.numel())
        return residual * 2 if per_sample else tuple(r.repeat(2, 1, 1, 1) if r.numel() else r for r in residual)
    return residual.repeat(2, 1, 1, 1)


def given(**named) -> dict:
    """The arguments that were given (a processor may not name the others)."""
    return {name: value for name, value in named.items() if value is not None}


def lead(output):
    """A layer output's image stream: the output, or the first of a joint layer's (image, text)."""
    return output[0] if isinstance(output, tuple) else output


def each(fn, *outputs):
    """``fn`` over layer outputs, stream by stream where a joint layer returns (image, text)."""
    if isinstance(outputs[0], tuple):
        return tuple(fn(*streams) for streams in zip(*outputs, strict=True))
    return fn(*outputs)


__all__ = ["WHOLE", "Reordered", "both_halves", "call_spans", "each", "full_attention", "given", "half_of", "lead",
           "sequence_window"]
