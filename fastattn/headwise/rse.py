"""DiTFastAttnV2's per-layer metric: relative squared error of a layer's attention output."""

from __future__ import annotations

import torch


def relative_squared_error(output: torch.Tensor, reference: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """Per head: sum (y_m - y_o)^2 / sum (y_o - mean(y_o))^2, over every other dimension.

    ``output`` (a method's) and ``reference`` (full attention) share a shape whose axis
    ``head_dim`` indexes heads; returns a float tensor with one value per head. A constant
    reference head (zero variance) counts any change as infinitely bad and no change as 0.
    """
    if output.shape != reference.shape:
        raise ValueError(f"RSE needs equal shapes, got {tuple(output.shape)} and {tuple(reference.shape)}")
    y, y0 = output.float().movedim(head_dim, 0), reference.float().movedim(head_dim, 0)
    y, y0 = y.reshape(y.shape[0], -1), y0.reshape(y0.shape[0], -1)
    err = (y - y0).pow(2).sum(1)
    var = (y0 - y0.mean(1, keepdim=True)).pow(2).sum(1)
    rse = err / var
    return torch.where(err == 0, torch.zeros_like(rse), rse)
