"""Plans at a chosen attention-FLOPs fraction without a checkpoint to search on.

Latency benchmarks on random weights need plans with the paper's compression ratios, not
searched ones. The recipe is deterministic and mimics what the greedy search tends to produce
(DiTFastAttn Fig. 6): later steps are compressed harder than early ones, and each cell climbs
the ladder full -> asc -> wars -> wars+asc -> ast as a single knob c grows. Layers are offset
by a fixed pseudo-random amount so neighbouring layers do not switch together. Step 0 stays
full. c is found by bisection so the plan's module FLOPs fraction is the largest <= target.
"""

from __future__ import annotations

from typing import Any

from ..layerwise.methods import Method
from ..plan import CompressionPlan

LADDER = (Method.FULL, Method.ASC, Method.WARS, Method.WARS_ASC, Method.AST)


def _layer_offset(layer: int, num_layers: int) -> float:
    return ((layer * 7919) % num_layers) / max(1, num_layers)  # a fixed permutation of 0..1


def recipe_methods(num_steps: int, num_layers: int, c: float) -> list[list[Method]]:
    rows = [[Method.FULL] * num_layers]
    for s in range(1, num_steps):
        progress = s / max(1, num_steps - 1)
        row = []
        for l in range(num_layers):
            level = c * (0.5 + 0.5 * progress) * len(LADDER) + 0.5 * _layer_offset(l, num_layers) - 0.25
            row.append(LADDER[min(len(LADDER) - 1, max(0, int(level)))])
        rows.append(row)
    return rows


def plan_at_fraction(target: float, num_steps: int, model: dict[str, Any], window_size: float = 0.125,
                     iterations: int = 40) -> CompressionPlan:
    """The recipe plan whose attention FLOPs fraction (module, at ``model['seq_len']``) is the
    largest not above ``target``. ``model`` needs num_layers, num_heads, head_dim, seq_len."""
    if not 0 < target <= 1:
        raise ValueError(f"target attention FLOPs fraction must be in (0, 1], got {target}")
    missing = [k for k in ("num_layers", "num_heads", "head_dim", "seq_len") if k not in model]
    if missing:
        raise ValueError(f"plan recipe: model description lacks {', '.join(missing)}")

    def make(c: float) -> CompressionPlan:
        return CompressionPlan(recipe_methods(num_steps, model["num_layers"], c), window_size, dict(model),
                               {"recipe": "fastattn.search.recipe", "target_fraction": target, "knob": c})

    lo, hi = 0.0, 2.0
    if make(hi).attention_flops()["fraction"] > target:
        raise ValueError(f"plan recipe: {target} is below the most compressed plan "
                         f"({make(hi).attention_flops()['fraction']:.3f}; step 0 stays full)")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if make(mid).attention_flops()["fraction"] <= target:
            hi = mid
        else:
            lo = mid
    return make(hi)
