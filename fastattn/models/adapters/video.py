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
from typing import Any

import torch
from torch import nn

from ...kernels.dense import dense_attention
from ...kernels.video_masks import check_grid, tile_window_attention
from ...layerwise.processor import FastAttnProcessor, StepState
from .base import ModelAdapter



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


class WanFastAttnProcessor(FastAttnProcessor):
    """FastAttnProcessor for WanAttention: Wan's projections (RMSNorm across heads, then RoPE),
    exactly as diffusers' WanAttnProcessor computes them; the plan's band, or the 3-D tile window."""

    def __init__(self, layer: int, state: StepState, inner: Any):
        super().__init__(layer, state, inner)
        self.rotary_emb = None  # of the current call; q and k of every compressed path need it

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        self.rotary_emb = rotary_emb
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb=rotary_emb,
                                **kwargs)

    def project_qkv(self, attn, x):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [batch, seq, heads, dim]
        if self.rotary_emb is not None:
            q, k = rotate(q, *self.rotary_emb), rotate(k, *self.rotary_emb)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def project_out(self, attn, o, x, dtype):
        o = o.transpose(1, 2).flatten(2, 3).to(dtype)
        return attn.to_out[1](attn.to_out[0](o))

    def window(self, q, k, v, residual=None):
        if self.state.window_shape == "band":
            return super().window(q, k, v, residual)
        grid = self.state.call.grid if self.state.call is not None else None
        if grid is None:
            raise RuntimeError(f"layer {self.layer}: no token grid; the transformer's forward was not called")
        out = tile_window_attention(q, k, v, check_grid(grid, q.shape[-2]), self.state.window_size)
        return out if residual is None else out + residual

    def refresh(self, q, k, v):
        if self.state.window_shape == "band":
            return super().refresh(q, k, v)
        o = dense_attention(q, k, v)
        return o, o - self.window(q, k, v)


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [batch, seq, heads, dim]: pairs (x[2i], x[2i+1]) rotated."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@dataclass(frozen=True)
class WanAdapter(ModelAdapter):
    """WanTransformer3DModel: one full 3-D self-attention (attn1) per block."""

    class_name: str = "WanTransformer3DModel"
    cond_first: bool = True
    blocks_attr: str = "blocks"
    # WanPipeline runs the conditional and unconditional passes as two calls: no CFG batch, so
    # there is nothing for ASC to share across within a call.
    cfg_batched: bool = False

    def _check_attention(self, attn: nn.Module, index: int) -> None:
        super()._check_attention(attn, index)
        if getattr(attn, "add_k_proj", None) is not None:
            raise ValueError(f"layer {index}: Wan self-attention with image key/value projections is not supported")

    def layer_kinds(self, transformer: nn.Module) -> list[str]:
        return ["full3d"] * len(transformer.blocks)

    def make_processors(self, transformer: nn.Module, state: StepState, inners: list) -> list[FastAttnProcessor]:
        return [WanFastAttnProcessor(i, state, inner) for i, inner in enumerate(inners)]
