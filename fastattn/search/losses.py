"""Losses between the transformer output with and without a compression candidate."""

from __future__ import annotations

import torch


def mean_relative_absolute_error(raw: torch.Tensor, compressed: torch.Tensor, eps: float = 1e-6) -> float:
    """DiTFastAttn appendix A.2: mean over elements of clip(|O - O'| / (max(|O|, |O'|) + eps), 0, 10)."""
    raw, compressed = raw.float(), compressed.float()
    rel = (raw - compressed).abs() / (torch.maximum(raw.abs(), compressed.abs()) + eps)
    return float(rel.clamp(0, 10).mean())


LOSSES = {"mean_relative_absolute_error": mean_relative_absolute_error}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name]
