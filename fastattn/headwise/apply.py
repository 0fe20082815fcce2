"""The head-wise family on a joint-attention transformer: install its processors, apply a HeadPlan.

Step and branch counting, per-branch caches, scheduler wrapping and clean removal are the
shared handle's (:mod:`fastattn.hooks`); this module only supplies the per-head state and
processors.
"""

from __future__ import annotations

from ..hooks import FastAttnHandle, install, split_pipeline
from .plan import HeadPlan
from .processor import HeadStepState, HeadwiseJointProcessor


def headwise_refusal(description, plan=None) -> str | None:
    """Why head-wise plans cannot run on a model, in one line; None when they can (every layer
    attends over a joint text + image sequence)."""
    if description.joint:
        wrapped = next((i for i, layer in enumerate(description.layers) if layer.io.wraps_inner), None)
        if wrapped is None:
            return None
        return (f"head-wise plans need each layer's q/k/v layout: layer {wrapped} of {description.class_name} has "
                "only its own processor (the generic adapter); write its adapter (docs/ARCHITECTURE.md)")
    first = next(i for i, layer in enumerate(description.layers) if layer.kind == "self")
    return (f"head-wise plans need a joint-attention model: layer {first} of {description.class_name} is "
            "self-attention (use a layer-wise plan, LayerPlan)")


def _joint_layers(transformer, adapter) -> tuple:
    """The description's layers, each attending over a joint text + image sequence."""
    description = adapter.description(transformer)
    if headwise_refusal(description):
        raise ValueError(headwise_refusal(description))
    return description.layers


def install_headwise(pipe_or_transformer) -> FastAttnHandle:
    """Head-wise processors and the counting hooks on the model, without a plan (a search drives them)."""

    def make_family(transformer, adapter, layers):
        described = _joint_layers(transformer, adapter)
        state = HeadStepState(len(layers), int(layers[0].heads))
        return state, [HeadwiseJointProcessor(i, state, attn.processor, layer.io)
                       for i, (attn, layer) in enumerate(zip(layers, described, strict=True))]

    return install(pipe_or_transformer, make_family)


def apply_headwise(pipe_or_transformer, plan: HeadPlan, adapter) -> FastAttnHandle:
    """Install and run ``plan`` (already checked against the model by :func:`fastattn.apply_fastattn`)."""
    transformer = split_pipeline(pipe_or_transformer)[0]
    _joint_layers(transformer, adapter)
    context = getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)
    if context is not None and context.ring_degree > 1:
        raise ValueError(f"{adapter.class_name} runs under diffusers' ring attention: head-wise plans run under "
                         "Ulysses alone (ring_degree=1); use a layer-wise plan (LayerPlan) with the ring")
    if context is not None and plan.num_heads % context.ulysses_degree:
        raise ValueError(f"a head-wise plan of {plan.num_heads} heads does not split into ulysses_degree="
                         f"{context.ulysses_degree} shares")
    if plan.uses_cfg_sharing() and not adapter.cfg_batched:
        raise ValueError(f"plan.heads uses 'cfg' (CFG sharing) but {adapter.class_name} pipelines run no CFG batch")
    handle = install_headwise(pipe_or_transformer)
    handle.set_plan(plan)
    return handle
