"""Multimodal DiTs (joint image + text attention): the SD3 and FLUX adapters.

SD3's joint sequence is the image tokens then the text tokens; FLUX puts the text first and
has double-stream blocks (separate projections, joint attention) followed by single-stream
blocks that attend over the already concatenated [text, image] sequence. Every block's ``attn``
is one layer, double-stream blocks first. Where the text sits is the layers' q/k/v layout's
(:data:`SD3_JOINT`, :data:`FLUX_JOINT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...attention_io import AttentionIO, project_qkv, split_heads
from .base import ModelAdapter


def sd3_qkv(attn, hidden_states, encoder_hidden_states=None, rotary=None):
    """SD3's joint attention: the image tokens' q, k, v (as :func:`project_qkv`), then the text's."""
    q, k, v = project_qkv(attn, hidden_states)
    if encoder_hidden_states is not None:
        eq, ek, ev = split_heads(attn, hidden_states.shape[0], k.shape[-1],
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


# SD3's JointAttnProcessor2_0: image tokens, then text. FLUX's FluxAttnProcessor: text first, RMS
# norms, RoPE over the joint sequence; single-stream blocks get the joint sequence already
# concatenated and have no output projection.
SD3_JOINT = AttentionIO("sd3_joint", sd3_qkv, sd3_out, text_first=False)
FLUX_JOINT = AttentionIO("flux_joint", flux_qkv, flux_out, rotary_arg="image_rotary_emb",
                         text_first=True)


@dataclass(frozen=True)
class MMDiTAdapter(ModelAdapter):
    single_blocks_attr: str | None = None  # FLUX's single-stream blocks, after the double-stream ones

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        blocks = list(getattr(transformer, self.blocks_attr))
        if self.single_blocks_attr:
            blocks += list(getattr(transformer, self.single_blocks_attr))
        return blocks

    def attention_kinds(self, transformer: nn.Module) -> list[str]:
        single = len(getattr(transformer, self.single_blocks_attr)) if self.single_blocks_attr else 0
        return ["joint"] * len(getattr(transformer, self.blocks_attr)) + ["single"] * single


SD3_ADAPTER = MMDiTAdapter("SD3Transformer2DModel", cond_first=False, attention_attr="attn", io=SD3_JOINT)
# FLUX.1-dev distils guidance into an embedding; true CFG (true_cfg_scale > 1) runs the
# conditional and unconditional passes as separate calls, so no call holds a CFG batch.
FLUX_ADAPTER = MMDiTAdapter("FluxTransformer2DModel", cond_first=True, attention_attr="attn", io=FLUX_JOINT,
                            single_blocks_attr="single_transformer_blocks", cfg_batched=False)

MMDIT_ADAPTERS = {a.class_name: a for a in (SD3_ADAPTER, FLUX_ADAPTER)}
