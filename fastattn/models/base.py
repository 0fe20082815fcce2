"""What fastattn needs to know about one transformer architecture.

An adapter names the self-attention layers the techniques act on (one per block, so a layer
index is also a block index), where the conditional half sits in a CFG batch, and how to read
the sample tensor out of the transformer's return value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    class_name: str
    cond_first: bool  # DiT pipelines put the conditional half first; PixArt the unconditional
    default_guidance_scale: float
    blocks_attr: str = "transformer_blocks"
    attention_attr: str = "attn1"  # self-attention; cross-attention (attn2) stays untouched

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(getattr(transformer, self.blocks_attr))

    def attention_layers(self, transformer: nn.Module) -> list[nn.Module]:
        layers = [getattr(b, self.attention_attr) for b in self.blocks(transformer)]
        for i, attn in enumerate(layers):
            self._check_attention(attn, i)
        return layers

    def _check_attention(self, attn: nn.Module, index: int) -> None:
        # The compressed paths re-implement the projections of diffusers' AttnProcessor2_0 for
        # plain self-attention; refuse layouts they would get wrong rather than guess.
        for attr in ("group_norm", "spatial_norm"):
            if getattr(attn, attr, None) is not None:
                raise ValueError(f"layer {index}: attention with {attr} is not supported by fastattn")
        if getattr(attn, "is_cross_attention", False):
            raise ValueError(f"layer {index}: {self.attention_attr} is cross-attention, expected self-attention")

    def describe(self, transformer: nn.Module) -> dict[str, Any]:
        layers = self.attention_layers(transformer)
        attn = layers[0]
        inner = attn.to_q.out_features
        return {
            "class_name": type(transformer).__name__,
            "num_layers": len(layers),
            "num_heads": int(attn.heads),
            "head_dim": int(inner // attn.heads),
            "model_dim": int(attn.to_q.in_features),
            "cond_first": self.cond_first,
        }

    @staticmethod
    def sample(output: Any) -> torch.Tensor:
        """The predicted tensor from a transformer return value (tuple or output dataclass)."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return output[0]
        return output.sample
