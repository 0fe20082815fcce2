"""How an attention layer turns its inputs into q, k, v and the attention output back into what
the layer returns: an :class:`AttentionIO`, shared by both families.

A processor replaces only the attention core, so everything around it must match the model's
own processor, op for op. This module holds the type and diffusers' ``AttnProcessor2_0`` layout
(:data:`SELF`: self-attention, optional q/k norms), which most models use; a model whose layers
project otherwise defines its layout in its adapter file (Wan's RoPE, Open-Sora's fused qkv,
SD3's and FLUX's joint attention) and names it in its description
(:mod:`fastattn.models.adapters`). q, k, v are [batch, heads, seq, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AttentionIO:
    """The q/k/v and output projections of one kind of attention layer.

    ``qkv(attn, hidden_states, encoder_hidden_states=None, rotary=None) -> (q, k, v)``;
    ``out(attn, o, hidden_states, dtype, encoder_hidden_states=None)``: what the layer returns,
    ``o`` cast to ``dtype`` (the model's). ``attn`` is the module the processor is called with.
    """

    name: str
    qkv: Callable
    out: Callable
    rotary_arg: str | None = None  # the layer call's keyword that carries the rotary embedding
    text_first: bool | None = None  # joint sequences: text before the image tokens; None: no text
    # True: the layer's own processor projects (fastattn.core_call replaces only its attention core)
    wraps_inner: bool = False

    def image_span(self, seq_len: int, text_len: int) -> tuple[int, int]:
        """(first image token, number of image tokens) in a joint sequence of ``seq_len``."""
        if not 0 <= text_len < seq_len:
            raise ValueError(f"text length {text_len} does not fit a joint sequence of {seq_len} tokens")
        return (text_len if self.text_first else 0), seq_len - text_len


def split_heads(attn, batch: int, head_dim: int, *tensors: torch.Tensor):
    return tuple(t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in tensors)


def project_qkv(attn, x: torch.Tensor, encoder_hidden_states=None, rotary=None):
    """q, k, v as diffusers' AttnProcessor2_0 computes them for self-attention (no text, no rotary)."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q, k, v = split_heads(attn, x.shape[0], k.shape[-1] // attn.heads, q, k, v)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k, v


def project_out(attn, o: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, encoder_hidden_states=None):
    """Merge heads and apply the output projection, as diffusers' AttnProcessor2_0 does."""
    batch, heads, seq, head_dim = o.shape
    o = o.transpose(1, 2).reshape(batch, seq, heads * head_dim).to(dtype)
    o = attn.to_out[1](attn.to_out[0](o))
    if attn.residual_connection:
        o = o + x
    return o / attn.rescale_output_factor


SELF = AttentionIO("self", project_qkv, project_out)


def _own_projections(*_args, **_kwargs):
    raise RuntimeError("a WRAPPED layer's projections are its own processor's (fastattn.core_call)")


# Any layer whose own processor makes one plain scaled_dot_product_attention call: that processor
# runs whole, with its attention core replaced (the generic adapter's layers).
WRAPPED = AttentionIO("wrapped", _own_projections, _own_projections, wraps_inner=True)
