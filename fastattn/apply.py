"""``apply_fastattn``: run a plan of any family on a pipeline, looked up by the plan's type.

A new family is a folder (its plan type, state, processors and apply function) and one line in
:data:`FAMILIES`.
"""

from __future__ import annotations

from .cache_store import CacheStore, parse_cache_options
from .family import OTHER_RESOLUTION
from .headwise.apply import apply_headwise, headwise_refusal
from .headwise.plan import HeadPlan
from .hooks import FastAttnHandle, remove_fastattn, split_pipeline
from .layerwise.apply import apply_layerwise, layerwise_refusal
from .layerwise.plan import LayerPlan
from .models import get_adapter
from .plan import CompressionPlan

FAMILIES = {LayerPlan: apply_layerwise, HeadPlan: apply_headwise}
# Why a family cannot serve a model (a ModelDescription), one line naming the layer; None: it can.
REFUSALS = {LayerPlan: layerwise_refusal, HeadPlan: headwise_refusal}


def refusal(plan_type: type, description, plan: CompressionPlan | None = None) -> str | None:
    """Why plans of ``plan_type`` (or ``plan`` itself) cannot run on the described model; None when they can."""
    return REFUSALS[plan_type](description, plan)


def apply_fastattn(pipe_or_transformer, plan: CompressionPlan, cuda_graphs: bool = False,
                   other_resolution: str = "warn", cache_dtype=None, cache_device=None) -> FastAttnHandle:
    """Compress a pipeline's (or a transformer's) attention according to ``plan``.

    The plan is checked against the model first (layer and head counts, class), and against the
    scheduler's step count and each call's CFG layout as the generation runs. ``cuda_graphs=True``
    replays each distinct step layout from a CUDA graph (:mod:`fastattn.cuda_graphs`): worth it
    where the host cannot keep up with small kernels (about 4096 tokens or fewer).

    ``other_resolution`` says what happens where a generation's attention calls have another
    token count than the plan was searched at (``plan.model["seq_len"]``, checked once per
    generation): ``"warn"`` (the default) logs one line naming both counts, once per pair;
    ``"refuse"`` raises :class:`~fastattn.family.OtherResolutionError` (a ValueError) at the
    generation's first attention call; ``"allow"`` runs it silently.

    ``cache_dtype="float8_e4m3fn"`` keeps the caches a plan carries from step to step (AST
    outputs, WA-RS residuals, head-wise per-head outputs and residuals) in FP8 e4m3 with one scale
    per sample and head (:mod:`fastattn.cache_store`): a quarter of float32's bytes, half of
    bf16's. ``cache_device="cpu"`` keeps them in host memory (not with CUDA graphs): on CUDA in
    reused pinned buffers, written and fetched back on side streams, each call's reads two ahead
    of use (:mod:`fastattn.cache_prefetch`), so the GPU holds a few caches instead of all.
    Both default to None: caches as computed, bit for bit.

    Returns the handle (:func:`fastattn.get_handle`); :func:`fastattn.remove_fastattn` undoes it exactly.
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
    if other_resolution not in OTHER_RESOLUTION:
        raise ValueError(f"other_resolution must be one of {', '.join(OTHER_RESOLUTION)}, got {other_resolution!r}")
    dtype, device = parse_cache_options(cache_dtype, cache_device, cuda_graphs)
    transformer, _ = split_pipeline(pipe_or_transformer)
    adapter = get_adapter(transformer)
    description = adapter.description(transformer)  # checked before the model is touched
    if type(plan) in REFUSALS and refusal(type(plan), description, plan):
        raise ValueError(refusal(type(plan), description, plan))
    plan.check_model(description.facts())
    if cuda_graphs and next(transformer.parameters()).device.type != "cuda":
        raise ValueError("cuda_graphs=True needs the transformer on a CUDA device")
    handle = FAMILIES[type(plan)](pipe_or_transformer, plan, adapter)
    handle.state.other_resolution = other_resolution
    if dtype is not None or device is not None:
        handle.state.cache_store = CacheStore(dtype, device)
    if cuda_graphs:
        try:
            handle.enable_cuda_graphs()
        except NotImplementedError:
            remove_fastattn(pipe_or_transformer)
            raise
    return handle


__all__ = ["FAMILIES", "REFUSALS", "apply_fastattn", "refusal"]
