"""Video diffusion transformers: Latte (alternating spatial and temporal attention) and Wan
(full 3-D attention with RoPE).

Each self-attention layer has a *kind* that fixes the geometry its window lives in:

- ``spatial``  one frame's tokens (Latte's ``transformer_blocks``): a band over the frame's raster
  tokens, the 1-D band of the image models;
- ``temporal`` one location's frames (Latte's ``temporal_transformer_blocks``): a band over frames;
- ``full3d``   every token of the video (Wan's ``blocks``): with ``window_shape="band"`` (the
  plans' default) the paper's 1-D band over the flattened (frame, row, col) sequence, the same
  kernels as the image models (FlashAttention-4's window and merged refresh on Hopper); with
  ``window_shape="tile"`` a 3-D tile neighbourhood (:mod:`fastattn.kernels.video_masks`).

Layer indices follow execution order, so Latte's layer 2i is spatial block i and 2i+1 its
temporal block. :func:`layers_of_kind` lists the layers a search may compress
(``search_plan(..., layers=...)``) when the techniques should act on some kinds only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...attention_io import AttentionIO
from .base import ModelAdapter


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


# Wan's self-attention layers: RMSNorm across heads, then RoPE (its module passes the rotary
# embedding by position; the processors name it by WanAttnProcessor's signature).
WAN_ROTARY = AttentionIO("wan_rotary", wan_qkv, wan_out, rotary_arg="rotary_emb")


@dataclass(frozen=True)
class LatteAdapter(ModelAdapter):
    """LatteTransformer3DModel: spatial block i then temporal block i, PixArt-style blocks."""

    class_name: str = "LatteTransformer3DModel"
    cond_first: bool = False  # LattePipeline batches [unconditional, conditional]

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        pairs = zip(transformer.transformer_blocks, transformer.temporal_transformer_blocks, strict=True)
        return [block for pair in pairs for block in pair]

    def layer_kinds(self, transformer: nn.Module) -> list[str]:
        return ["spatial", "temporal"] * len(transformer.transformer_blocks)


@dataclass(frozen=True)
class WanAdapter(ModelAdapter):
    """WanTransformer3DModel: one full 3-D self-attention (attn1) per block."""

    class_name: str = "WanTransformer3DModel"
    cond_first: bool = True
    blocks_attr: str = "blocks"
    # WanPipeline runs the conditional and unconditional passes as two calls: no CFG batch, so
    # there is nothing for ASC to share across within a call.
    cfg_batched: bool = False
    io: AttentionIO = WAN_ROTARY  # RMSNorm across heads, then RoPE, as diffusers' WanAttnProcessor

    def _check_attention(self, attn: nn.Module, index: int) -> None:
        super()._check_attention(attn, index)
        if getattr(attn, "add_k_proj", None) is not None:
            raise ValueError(f"layer {index}: Wan self-attention with image key/value projections is not supported")

    def layer_kinds(self, transformer: nn.Module) -> list[str]:
        return ["full3d"] * len(transformer.blocks)
