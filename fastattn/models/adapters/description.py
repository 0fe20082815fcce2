"""What an adapter says about a model: plain facts, from which each family builds its processors.

A :class:`ModelDescription` holds one :class:`AttentionLayer` per layer the techniques act on
(in execution order, so a layer index is also a block index), the CFG layout of the model's
pipelines and the patch size its token grid is read with. ``facts()`` is the dictionary plans
are checked against (``CompressionPlan.check_model``) and record as what they were made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...attention_io import AttentionIO

# what a layer attends over: its own tokens ('self'), the text and image streams of an MMDiT
# concatenated ('joint'), or a joint sequence that arrives already concatenated ('single',
# FLUX's single-stream blocks)
ATTENTION_KINDS = ("self", "joint", "single")
JOINT_KINDS = ("joint", "single")
# how a layer's processor attends: one scaled_dot_product_attention call fastattn can replace
# ('sdpa'), or something else ('opaque': Sana's linear attention), which window techniques cannot act on
ATTENTION_CORES = ("sdpa", "opaque")


@dataclass(frozen=True)
class AttentionLayer:
    kind: str  # one of ATTENTION_KINDS
    geometry: str  # where its window lives: 'spatial', 'temporal' or 'full3d' (registry.KINDS)
    io: AttentionIO  # its q/k/v and output projections
    core: str = "sdpa"  # one of ATTENTION_CORES

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {', '.join(ATTENTION_KINDS)}, got {self.kind!r}")
        if self.core not in ATTENTION_CORES:
            raise ValueError(f"attention core must be one of {', '.join(ATTENTION_CORES)}, got {self.core!r}")


@dataclass(frozen=True)
class ModelDescription:
    class_name: str
    layers: tuple[AttentionLayer, ...]
    num_heads: int
    head_dim: int
    model_dim: int
    # True: the pipelines put both CFG branches in one batch; False: separate calls (FLUX true CFG, Wan)
    cfg_batched: bool
    cond_first: bool  # in a CFG batch, the conditional half comes first (when the call does not say)
    patch_size: tuple[int, int, int] | None  # over (frames, rows, cols); None: token inputs
    timestep_arg: str = "timestep"  # the forward argument the step counter reads (HiDream: timesteps, Z-Image: t)

    @property
    def joint(self) -> bool:
        """Every layer attends over a joint text + image sequence (what head-wise plans act on)."""
        return all(layer.kind in JOINT_KINDS for layer in self.layers)

    @property
    def text_first(self) -> bool | None:
        return self.layers[0].io.text_first if self.layers else None

    def facts(self) -> dict[str, Any]:
        """What plans are checked against (the same keys and order as before descriptions existed)."""
        info = {"class_name": self.class_name, "num_layers": len(self.layers), "num_heads": self.num_heads,
                "head_dim": self.head_dim, "model_dim": self.model_dim}
        if self.joint:
            info.update(joint=True, text_first=self.text_first)
        return info
