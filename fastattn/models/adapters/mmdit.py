"""Multimodal DiTs (joint image + text attention): the SD3 and FLUX adapters.

SD3's joint sequence is the image tokens then the text tokens; FLUX puts the text first and
has double-stream blocks (separate projections, joint attention) followed by single-stream
blocks that attend over the already concatenated [text, image] sequence. Every block's ``attn``
is one layer, double-stream blocks first. Where the text sits is the layers' q/k/v layout's
(:data:`~fastattn.attention_io.SD3_JOINT`, :data:`~fastattn.attention_io.FLUX_JOINT`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...attention_io import FLUX_JOINT, SD3_JOINT
from .base import ModelAdapter


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
