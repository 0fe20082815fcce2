"""The head-wise part of :class:`~fastattn.plan.CompressionPlan`: shape, rules and FLOPs.

Kept apart from ``plan.py`` so the V1 plan stays readable; ``CompressionPlan`` calls in here
only when ``plan.heads`` is set.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..flops import core_flops, projection_flops
from ..methods import Method
from .methods import HeadMethod


def parse_head_grid(heads, methods) -> list[list[list[HeadMethod]]]:
    """Check ``heads`` is [steps][layers][heads] like ``methods`` and parse every entry."""
    if not isinstance(heads, (list, tuple)) or len(heads) != len(methods):
        n = len(heads) if isinstance(heads, (list, tuple)) else type(heads).__name__
        raise ValueError(f"plan.heads must have one row per step ({len(methods)}), got {n}")
    num_heads = None
    grid = []
    for s, row in enumerate(heads):
        if not isinstance(row, (list, tuple)) or len(row) != len(methods[s]):
            raise ValueError(f"plan.heads[{s}] must list {len(methods[s])} layers")
        out_row = []
        for l, layer in enumerate(row):
            if not isinstance(layer, (list, tuple)) or not layer:
                raise ValueError(f"plan.heads[{s}][{l}] must be a non-empty list of head methods")
            num_heads = len(layer) if num_heads is None else num_heads
            if len(layer) != num_heads:
                raise ValueError(f"plan.heads[{s}][{l}] has {len(layer)} heads, expected {num_heads} "
                                 "like plan.heads[0][0]")
            out_row.append([HeadMethod.parse(h, f"plan.heads[{s}][{l}][{i}]") for i, h in enumerate(layer)])
            if methods[s][l] is not Method.FULL:
                raise ValueError(f"plan.methods[{s}][{l}] must be 'full' in a head-wise plan (plan.heads decides)")
        grid.append(out_row)
    return grid


def validate_head_grid(heads: list[list[list[HeadMethod]]]) -> None:
    """A cached head reuses the previous step's output, so step 0 must compute every head."""
    for l, layer in enumerate(heads[0]):
        for h, m in enumerate(layer):
            if not m.computes:
                raise ValueError(f"plan.heads[0][{l}][{h}]: 'cache' needs an earlier step of the head to reuse")


def head_counts(heads: list[list[list[HeadMethod]]]) -> dict[str, int]:
    c = Counter(str(m) for row in heads for layer in row for m in layer)
    return dict(sorted(c.items()))


def headwise_flops(plan, seq_len: int | None = None) -> dict[str, Any]:
    """Attention FLOPs of a head-wise plan against the raw model (same keys as the V1 count).

    The q/k/v/out projections are counted in full at every step (they are dense matmuls over
    all heads); each head's score and value products count the pairs its method attends.
    ``sparsity`` is the V2 paper's attention sparsity: 1 - core_fraction.
    """
    model = plan.model
    seq_len = int(seq_len or model.get("seq_len") or 0)
    heads, head_dim, text_len = model.get("num_heads"), model.get("head_dim"), model.get("text_len")
    if not seq_len or not heads or not head_dim or text_len is None:
        raise ValueError("plan.model needs seq_len, text_len, num_heads and head_dim to count head-wise FLOPs")
    image_len = seq_len - int(text_len)
    inner = heads * head_dim
    proj = projection_flops(2, seq_len, model.get("model_dim") or inner, inner)
    raw_core = core_flops(2, heads, head_dim, seq_len * seq_len)
    pair_cache: dict[HeadMethod, int] = {}

    def cell_core(layer_methods) -> float:
        total = 0
        for m in layer_methods:
            if m not in pair_cache:
                pair_cache[m] = m.pairs(image_len, int(text_len))
            total += pair_cache[m]
        return core_flops(2, 1, head_dim, total)

    cores = [[cell_core(layer) for layer in row] for row in plan.heads]
    n_steps, n_layers = len(cores), len(cores[0])
    n_cells = n_steps * n_layers
    core_total = sum(map(sum, cores))
    raw_total = (proj + raw_core) * n_cells
    return {
        "seq_len": seq_len,
        "fraction": (proj * n_cells + core_total) / raw_total,
        "core_fraction": core_total / (raw_core * n_cells),
        "sparsity": 1 - core_total / (raw_core * n_cells),
        "raw_flops_per_pair": raw_total,
        "flops_per_pair": proj * n_cells + core_total,
        "per_step": [(proj * n_layers + sum(row)) / ((proj + raw_core) * n_layers) for row in cores],
        "per_layer": [(proj * n_steps + sum(cores[s][l] for s in range(n_steps))) / ((proj + raw_core) * n_steps)
                      for l in range(n_layers)],
    }


def render_heads(heads: list[list[list[HeadMethod]]]) -> str:
    """One line per step; per layer one character per head: . full, c cache, a arrow."""
    code = {"full": ".", "cache": "c", "arrow": "a"}
    lines = ["step | layers (heads: .=full c=cache a=arrow)"]
    for s, row in enumerate(heads):
        lines.append(f"{s:4d} | " + " ".join("".join(code[m.kind] for m in layer) for layer in row))
    return "\n".join(lines)
