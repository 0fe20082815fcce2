"""Multimodal DiTs (joint image + text attention): the SD3 and FLUX adapters.

SD3's joint sequence is the image tokens then the text tokens; FLUX puts the text first and
has double-stream blocks (separate projections, joint attention) followed by single-stream
blocks that attend over the already concatenated [text, image] sequence. Every block's ``attn``
is one layer, double-stream blocks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import ModelAdapter


@dataclass(frozen=True)
class MMDiTAdapter(ModelAdapter):
    text_first: bool = False  # where the text tokens sit in the joint sequence
    single_blocks_attr: str | None = None  # FLUX's single-stream blocks, after the double-stream ones

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        blocks = list(getattr(transformer, self.blocks_attr))
        if self.single_blocks_attr:
            blocks += list(getattr(transformer, self.single_blocks_attr))
        return blocks

    def image_span(self, seq_len: int, text_len: int) -> tuple[int, int]:
        """(first image token, number of image tokens) in a joint sequence of ``seq_len``."""
        if not 0 <= text_len < seq_len:
            raise ValueError(f"text length {text_len} does not fit a joint sequence of {seq_len} tokens")
        return (text_len if self.text_first else 0), seq_len - text_len

    def describe(self, transformer: nn.Module) -> dict[str, Any]:
        info = super().describe(transformer)
        info["joint"] = True
        info["text_first"] = self.text_first
        return info


SD3_ADAPTER = MMDiTAdapter("SD3Transformer2DModel", cond_first=False,
                           attention_attr="attn", text_first=False)
# FLUX.1-dev distils guidance into an embedding; true CFG (true_cfg_scale > 1) runs the
# conditional and unconditional passes as separate calls, so no call holds a CFG batch.
FLUX_ADAPTER = MMDiTAdapter("FluxTransformer2DModel", cond_first=True,
                            attention_attr="attn", text_first=True, single_blocks_attr="single_transformer_blocks",
                            cfg_batched=False)

MMDIT_ADAPTERS = {a.class_name: a for a in (SD3_ADAPTER, FLUX_ADAPTER)}
