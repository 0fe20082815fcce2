"""The processor that runs one joint-attention layer head by head (DiTFastAttnV2).

Every processor of a transformer shares a :class:`HeadStepState` saying, for the step being
run, each layer's per-head methods and whether the layer must keep its per-head outputs for a
cached head at the next step. A layer whose heads are all ``full`` and need not keep anything
calls the model's own processor, so an all-full plan is bit-identical to the unmodified model.
Otherwise the computing heads (full and arrow) run as one arrow-attention call; cached heads
take their output from the previous step and cost no attention.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..kernels.arrow import SKIP, arrow_attention, device_constant
from .methods import FULL, HeadMethod
from .projections import LAYOUTS


class HeadStepState:
    """What every head of every layer does at the step being run."""

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.step = -1
        self.calls = 0
        self.text_len: int | None = None  # set by the layers that see the text stream
        self.seq_len: int | None = None  # the joint sequence
        self.methods: list[list[HeadMethod]] = [[FULL] * num_heads for _ in range(num_layers)]
        self.keep: list[bool] = [False] * num_layers
        # The search sets this: decide(layer, q, k, v, image_start, image_len, cache) -> (o, methods)
        self.decide: Callable | None = None


def headwise_attention(q, k, v, methods: list[HeadMethod], image_start: int, image_len: int,
                       cache: torch.Tensor | None, cond_half: slice | None = None,
                       update_cache: bool = False) -> torch.Tensor:
    """Attention outputs [batch, heads, seq, head_dim] with each head's method.

    Full and arrow heads run as one kernel call; cached heads enter it with an empty mask (no
    work) and take their output from ``cache``, the layer's per-head outputs at the previous
    step; ``cfg`` heads attend on the ``cond_half`` of the batch only and copy it to the other half.
    With ``update_cache`` the computing heads are written into ``cache`` itself, which is
    returned: no copy of the cached heads (the processor owns its cache; the result is this step's).
    """
    cached = [m.kind == "cache" for m in methods]
    shared = [m.kind == "cfg" for m in methods]
    if any(cached) and (cache is None or cache.shape != q.shape):
        have = None if cache is None else tuple(cache.shape)
        raise RuntimeError(f"cached heads need the previous step's outputs of shape {tuple(q.shape)}, have {have}")
    if any(shared) and cond_half is None:
        raise ValueError("'cfg' heads need a CFG batch (an even batch with a known conditional half)")
    if all(cached):
        return cache
    widths = [SKIP if c or s else m.half_width(image_len) for m, c, s in zip(methods, cached, shared)]
    in_place = update_cache and any(cached) and cache.dtype == q.dtype
    o = arrow_attention(q, k, v, widths, image_start, image_len, out=cache if in_place else None)
    if any(cached) and not in_place:
        keep = device_constant(tuple(cached), q.device)[None, :, None, None]
        o = torch.where(keep, cache.to(o.dtype), o)
    if any(shared):
        sel = device_constant(tuple(h for h, s in enumerate(shared) if s), q.device)
        o_cond = arrow_attention(*(t[cond_half].index_select(1, sel) for t in (q, k, v)),
                                 [image_len] * len(sel), image_start, image_len)
        o.index_copy_(1, sel, torch.cat([o_cond, o_cond]).to(o.dtype))  # the same for both halves
    return o


def cond_half_of(batch: int, cond_first: bool) -> slice | None:
    """Where the conditional samples sit in a CFG batch; None for an odd batch."""
    if batch % 2:
        return None
    return slice(0, batch // 2) if cond_first else slice(batch // 2, batch)


class HeadwiseJointProcessor:
    """Executes the current step's head methods for one joint-attention layer."""

    def __init__(self, layer: int, state: HeadStepState, inner: Any, adapter):
        self.layer = layer
        self.state = state
        self.inner = inner  # the model's own processor, for layers that are entirely full
        self.adapter = adapter
        self.qkv, self.out = LAYOUTS[adapter.class_name]
        self.head_out: torch.Tensor | None = None  # every head's output at the last step

    def reset(self) -> None:
        self.head_out = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        st, l = self.state, self.layer
        if attention_mask is not None:
            raise ValueError(f"layer {l}: head-wise attention does not support an attention_mask")
        if encoder_hidden_states is not None:
            st.text_len = encoder_hidden_states.shape[1]
        methods = st.methods[l]
        if st.decide is None and not st.keep[l] and all(m == FULL for m in methods):
            extra = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        if st.text_len is None:
            raise RuntimeError(f"layer {l}: text length unknown (no earlier layer saw the text stream)")
        q, k, v = self.qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        st.seq_len = q.shape[-2]
        image_start, image_len = self.adapter.image_span(q.shape[-2], st.text_len)
        if st.decide is not None:
            o, _ = st.decide(l, q, k, v, image_start, image_len, self.head_out)
        else:
            cond = cond_half_of(q.shape[0], self.adapter.cond_first) if self.adapter.cfg_batch else None
            o = headwise_attention(q, k, v, methods, image_start, image_len, self.head_out, cond, update_cache=True)
        if st.keep[l] or st.decide is not None:
            self.head_out = o
        return self.out(attn, o.to(q.dtype), hidden_states, encoder_hidden_states)
