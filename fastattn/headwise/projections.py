"""q/k/v and output projections of the joint-attention layers, as diffusers 0.42 computes them.

The head-wise processor replaces only the attention core, so everything around it must match
the model's own processor: SD3's ``JointAttnProcessor2_0`` (image tokens, then text) and
FLUX's ``FluxAttnProcessor`` (text first, RMS norms, RoPE over the joint sequence; single-stream
blocks get the joint sequence already concatenated and have no output projection).
q, k, v are returned as [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch


def sd3_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    batch = hidden_states.shape[0]
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = k.shape[-1] // attn.heads

    def heads(t):
        return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is not None:
        eq = heads(attn.add_q_proj(encoder_hidden_states))
        ek = heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
    return q, k, v


def sd3_out(attn, o, hidden_states, encoder_hidden_states):
    batch, heads, _, head_dim = o.shape
    o = o.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    context = None
    if encoder_hidden_states is not None:
        o, context = o[:, : hidden_states.shape[1]], o[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    o = attn.to_out[1](attn.to_out[0](o))
    return (o, context) if encoder_hidden_states is not None else o


def flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None):
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    # diffusers' native backend runs SDPA on exactly this permutation
    return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def flux_out(attn, o, hidden_states, encoder_hidden_states):
    o = o.permute(0, 2, 1, 3).flatten(2, 3)
    if encoder_hidden_states is None:  # single-stream block: the block projects it
        return o
    text_len = encoder_hidden_states.shape[1]
    context, o = o.split_with_sizes([text_len, o.shape[1] - text_len], dim=1)
    o = attn.to_out[1](attn.to_out[0](o.contiguous()))
    return o, attn.to_add_out(context.contiguous())


LAYOUTS = {"SD3Transformer2DModel": (sd3_qkv, sd3_out), "FluxTransformer2DModel": (flux_qkv, flux_out)}
