"""DiTFastAttnV2's per-layer metric: relative squared error of a layer's attention output."""

from __future__ import annotations

import torch


def _other_dims(t: torch.Tensor, head_dim: int) -> tuple[int, ...]:
    return tuple(d for d in range(t.ndim) if d != head_dim % t.ndim)


def relative_squared_errors(outputs, reference: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """[heads, len(outputs)]: per head and output, sum (y_m - y_o)^2 / sum (y_o - mean(y_o))^2
    over every dimension but ``head_dim``.

    The reference's variance is computed once for all outputs; each difference is taken in the
    reference's dtype and reduced in float32 (one pass over a bf16 tensor instead of several
    over float32 copies: the search does this for every candidate of every layer and step).
    A constant reference head (zero variance) counts any change as infinitely bad and none as 0.
    """
    dims = _other_dims(reference, head_dim)
    var = torch.var(reference.float(), dim=dims, correction=0) * (reference.numel() // reference.shape[head_dim])
    columns = []
    for output in outputs:
        if output.shape != reference.shape:
            raise ValueError(f"RSE needs equal shapes, got {tuple(output.shape)} and {tuple(reference.shape)}")
        if output is reference:
            columns.append(torch.zeros_like(var))
            continue
        err = torch.linalg.vector_norm(output.to(reference.dtype) - reference, dim=dims, dtype=torch.float32) ** 2
        columns.append(torch.where(err == 0, torch.zeros_like(err), err / var))
    return torch.stack(columns, dim=1)


def relative_squared_error(output: torch.Tensor, reference: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """Per head: sum (y_m - y_o)^2 / sum (y_o - mean(y_o))^2, over every other dimension."""
    return relative_squared_errors([output], reference, head_dim)[:, 0]
