"""The layer-wise (DiTFastAttn) family: install its processors and apply a :class:`LayerPlan`."""

from __future__ import annotations

from ..hooks import FastAttnHandle, install
from .plan import LayerPlan
from .processor import FastAttnProcessor, StepState


def layerwise_refusal(description) -> str | None:
    """Why layer-wise plans cannot run on a model, in one line naming the first layer they cannot
    serve; None when they can. Their techniques act on self-attention layers: a joint (text +
    image) layer returns two streams and a single-stream one attends over text too."""
    for i, layer in enumerate(description.layers):
        if layer.kind != "self":
            return (f"layer {i} of {description.class_name} is {layer.kind} (text + image) attention; layer-wise "
                    "plans act on self-attention layers only (use a head-wise plan, HeadPlan)")
    return None


def install_layerwise(pipe_or_transformer, window_size: float = 0.125, refresh_on: str = "full",
                      forecast_in: str = "timestep", window_shape: str = "band") -> FastAttnHandle:
    """Layer-wise processors and the counting hooks on the model, without a plan (a search drives them)."""

    def make_family(transformer, adapter, layers):
        state = StepState(len(layers), window_size, window_shape, refresh_on=refresh_on, forecast_in=forecast_in)
        description = adapter.description(transformer)
        if layerwise_refusal(description):
            raise ValueError(layerwise_refusal(description))
        described = description.layers
        return state, [FastAttnProcessor(i, state, attn.processor, layer.io, layer.geometry)
                       for i, (attn, layer) in enumerate(zip(layers, described, strict=True))]

    return install(pipe_or_transformer, make_family)


def apply_layerwise(pipe_or_transformer, plan: LayerPlan, adapter) -> FastAttnHandle:
    """Install and run ``plan`` (already checked against the model by :func:`fastattn.apply_fastattn`)."""
    if plan.uses_cfg_sharing() and not adapter.cfg_batched:
        raise ValueError(f"plan uses 'asc' or 'wars+asc' but {adapter.class_name} runs the conditional and "
                         "unconditional passes as separate calls (no CFG batch to share across)")
    handle = install_layerwise(pipe_or_transformer, plan.window_size, plan.refresh_on, plan.forecast_in,
                               plan.window_shape)
    handle.set_plan(plan)
    return handle
