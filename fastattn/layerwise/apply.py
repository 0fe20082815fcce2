"""The layer-wise (DiTFastAttn) family: install its processors and apply a :class:`LayerPlan`."""

from __future__ import annotations

from ..attention_io import WRAPPED, AttentionIO
from ..hooks import FastAttnHandle, install
from .plan import LayerPlan
from .processor import FastAttnProcessor, StepState


def layerwise_refusal(description, plan=None) -> str | None:
    """Why ``plan`` cannot run on a model, in one line naming the first layer it cannot serve;
    None when it can. Every layer takes the layer-wise family (a joint or single-stream one through
    its own processor, :func:`layer_io`); a layer whose attention is no SDPA call (linear
    attention) takes no window method."""
    if plan is None:
        return None
    joint = next((i for i, layer in enumerate(description.layers) if layer.kind != "self"), None)
    windows = any(m.uses_window for row in plan.methods for m in row)
    if plan.window_shape != "band" and joint is not None and windows:
        return (f"layer {joint} of {description.class_name} is {description.layers[joint].kind} attention (text in its "
                f"sequence): the {plan.window_shape!r} window needs an image-only one; use window_shape='band'")
    opaque = [i for i, layer in enumerate(description.layers) if layer.core != "sdpa"]
    for step, row in enumerate(plan.methods):
        for i in opaque:
            if i < len(row) and row[i].uses_window:
                return (f"layer {i} of {description.class_name} attends without a scaled_dot_product_attention call "
                        f"(linear attention): step {step} gives it {row[i].value!r}; a window needs one (give it "
                        "full, ast, asc or forecast)")
    return None


def layer_io(layer, context_parallel: bool = False) -> AttentionIO:
    """The projections the layer-wise processor uses: a self-attention layer's own layout, and
    for a joint or single-stream layer its own processor with only the attention core replaced
    (WRAPPED: the window then covers its image tokens, full wherever text is involved); SD3's and
    FLUX's joint layouts serve the head-wise family. Under diffusers' context parallelism every
    layer runs its own processor, whose attention dispatch exchanges the sequence shards
    (Ulysses: whole sequences, a share of the heads, at the attention call fastattn answers)."""
    return layer.io if layer.kind == "self" and not context_parallel else WRAPPED


def install_layerwise(pipe_or_transformer, window_size: float = 0.125, refresh_on: str = "full",
                      forecast_in: str = "timestep", window_shape: str = "band") -> FastAttnHandle:
    """Layer-wise processors and the counting hooks on the model, without a plan (a search drives them)."""

    def make_family(transformer, adapter, layers):
        state = StepState(len(layers), window_size, window_shape, refresh_on=refresh_on, forecast_in=forecast_in)
        description = adapter.description(transformer)
        if layerwise_refusal(description):
            raise ValueError(layerwise_refusal(description))
        described = description.layers
        parallel = getattr(transformer, "_parallel_config", None) is not None  # diffusers' enable_parallelism
        return state, [FastAttnProcessor(i, state, attn.processor, layer_io(layer, parallel), layer.geometry,
                                         layer.core == "sdpa")
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
