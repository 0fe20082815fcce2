"""Attention FLOPs counting shared by every plan family, against the raw model.

Counts follow the paper's Table 1 "Attn FLOPs": the whole multi-head attention module, i.e. the
four projections (q, k, v, out) plus the score and value products. The products alone are
reported too ("core"). A multiply-add counts as 2 FLOPs. Costs are per CFG pair of samples
(batch 2), so they do not depend on the batch size. Each family counts its methods with these:
:mod:`fastattn.layerwise.flops`, :meth:`fastattn.headwise.plan.HeadPlan.attention_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .utils.moved import forward_moved


@dataclass(frozen=True)
class LayerCost:
    projections: float
    core: float

    @property
    def total(self) -> float:
        return self.projections + self.core

    def __add__(self, other: "LayerCost") -> "LayerCost":
        return LayerCost(self.projections + other.projections, self.core + other.core)

    def scaled(self, factor: float) -> "LayerCost":
        return LayerCost(self.projections * factor, self.core * factor)


ZERO = LayerCost(0.0, 0.0)


def projection_flops(batch: float, seq_len: int, model_dim: int, inner_dim: int) -> float:
    # q, k, v: model_dim -> inner_dim; out: inner_dim -> model_dim.
    return 2.0 * batch * seq_len * model_dim * inner_dim * 4


def core_flops(batch: float, heads: int, head_dim: int, pairs: int) -> float:
    # QK^T and PV each cost one multiply-add of length head_dim per (query, key) pair.
    return 4.0 * batch * heads * head_dim * pairs


# The layer-wise method costs that lived here.
__getattr__ = forward_moved(__name__, {"method_cost": "fastattn.layerwise.flops",
                                       "window_pair_count": "fastattn.layerwise.flops"})
