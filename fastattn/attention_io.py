"""How each kind of attention layer turns its inputs into q, k, v and the attention output back
into what the layer returns: one :class:`AttentionIO` per kind, shared by both families.

A processor replaces only the attention core, so everything around it must match the model's
own processor, op for op: diffusers' ``AttnProcessor2_0`` (:data:`SELF`), Wan's
(:data:`WAN_ROTARY`: RMSNorm across heads, then RoPE), Open-Sora's STDiT2 (:data:`STDIT_FUSED`:
one fused qkv Linear), SD3's ``JointAttnProcessor2_0`` (:data:`SD3_JOINT`: image tokens, then
text) and FLUX's ``FluxAttnProcessor`` (:data:`FLUX_JOINT`: text first, RMS norms, RoPE over the
joint sequence; single-stream blocks get the joint sequence already concatenated and have no
output projection). q, k, v are [batch, heads, seq, head_dim]. A model adapter names its
layers' AttentionIO in its description (:mod:`fastattn.models.adapters`).
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
    # The model processor's argument after attention_mask, which some modules pass by position:
    # diffusers' Attention names it temb, WanAttention passes its rotary embedding there.
    fifth_arg: str = "temb"
    text_first: bool | None = None  # joint sequences: text before the image tokens; None: no text

    def image_span(self, seq_len: int, text_len: int) -> tuple[int, int]:
        """(first image token, number of image tokens) in a joint sequence of ``seq_len``."""
        if not 0 <= text_len < seq_len:
            raise ValueError(f"text length {text_len} does not fit a joint sequence of {seq_len} tokens")
        return (text_len if self.text_first else 0), seq_len - text_len


def _split_heads(attn, batch: int, head_dim: int, *tensors: torch.Tensor):
    return tuple(t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in tensors)


def project_qkv(attn, x: torch.Tensor, encoder_hidden_states=None, rotary=None):
    """q, k, v as diffusers' AttnProcessor2_0 computes them for self-attention (no text, no rotary)."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q, k, v = _split_heads(attn, x.shape[0], k.shape[-1] // attn.heads, q, k, v)
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


def wan_qkv(attn, x: torch.Tensor, encoder_hidden_states=None, rotary=None):
    """Wan's self-attention: (fused or separate) projections, RMSNorm across heads, then RoPE."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [batch, seq, heads, dim]
    if rotary is not None:
        q, k = rotate(q, *rotary), rotate(k, *rotary)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def wan_out(attn, o: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, encoder_hidden_states=None):
    o = o.transpose(1, 2).flatten(2, 3).to(dtype)
    return attn.to_out[1](attn.to_out[0](o))


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [batch, seq, heads, dim]: pairs (x[2i], x[2i+1]) rotated."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def fused_qkv(slot, x: torch.Tensor, encoder_hidden_states=None, rotary=None):
    """STDiT2's fused qkv projection, q/k norms and optional rotary (``slot.module``: the attention)."""
    attn = slot.module
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    # v1.2 names the order in qk_norm_legacy; v1.1.0 has no such attribute and rotates first
    rotary_first = getattr(attn, "qk_norm_legacy", True)
    if attn.rope and rotary_first:
        q, k = attn.rotary_emb(q), attn.rotary_emb(k)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope and not rotary_first:
        q, k = attn.rotary_emb(q), attn.rotary_emb(k)
    return q, k, v


def fused_out(slot, o: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, encoder_hidden_states=None):
    b, heads, n, d = o.shape
    attn = slot.module
    return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(b, n, heads * d).to(dtype)))


def sd3_qkv(attn, hidden_states, encoder_hidden_states=None, rotary=None):
    """SD3's joint attention: the image tokens' q, k, v (as :func:`project_qkv`), then the text's."""
    q, k, v = project_qkv(attn, hidden_states)
    if encoder_hidden_states is not None:
        eq, ek, ev = _split_heads(attn, hidden_states.shape[0], k.shape[-1],
                                  attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                                  attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
    return q, k, v


def sd3_out(attn, o, hidden_states, dtype, encoder_hidden_states=None):
    batch, heads, _, head_dim = o.shape
    o = o.to(dtype).transpose(1, 2).reshape(batch, -1, heads * head_dim)
    context = None
    if encoder_hidden_states is not None:
        o, context = o[:, : hidden_states.shape[1]], o[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    o = attn.to_out[1](attn.to_out[0](o))
    return (o, context) if encoder_hidden_states is not None else o


def flux_qkv(attn, hidden_states, encoder_hidden_states=None, rotary=None):
    """FLUX's joint attention: [text, image] q, k, v with RMS norms, then RoPE over the joint sequence."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    # diffusers' native backend runs SDPA on exactly this permutation
    return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def flux_out(attn, o, hidden_states, dtype, encoder_hidden_states=None):
    o = o.to(dtype).permute(0, 2, 1, 3).flatten(2, 3)
    if encoder_hidden_states is None:  # single-stream block: the block projects it
        return o
    text_len = encoder_hidden_states.shape[1]
    context, o = o.split_with_sizes([text_len, o.shape[1] - text_len], dim=1)
    o = attn.to_out[1](attn.to_out[0](o.contiguous()))
    return o, attn.to_add_out(context.contiguous())


SELF = AttentionIO("self", project_qkv, project_out)
WAN_ROTARY = AttentionIO("wan_rotary", wan_qkv, wan_out, rotary_arg="rotary_emb", fifth_arg="rotary_emb")
STDIT_FUSED = AttentionIO("stdit_fused", fused_qkv, fused_out)
SD3_JOINT = AttentionIO("sd3_joint", sd3_qkv, sd3_out, text_first=False)
FLUX_JOINT = AttentionIO("flux_joint", flux_qkv, flux_out, rotary_arg="image_rotary_emb", fifth_arg="image_rotary_emb",
                         text_first=True)
