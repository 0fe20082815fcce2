"""fastattn under ``torch.compile``: how many graphs a plan needs, and regional compilation.

A compressed transformer compiles like the unmodified one, whole (``pipe.transformer.compile()``,
``torch.compile(pipe.transformer)``) or block by block (diffusers' ``compile_repeated_blocks()``,
or :func:`compile_blocks` for models that do not name their blocks):

* the step-and-branch decision is made outside the graph: the step hook runs eagerly (it is the
  one graph break of a whole-transformer compile, before any layer; with compiled blocks the
  transformer's own forward is eager anyway) and writes each layer's decision into its
  processor's small step object (:class:`fastattn.layerwise.processor.LayerStep`,
  :class:`fastattn.headwise.processor.HeadLayerStep`);
* a processor reads only that object and the shared state, so dynamo traces it without a break
  and guards on those Python values: each distinct decision is one graph, compiled once and
  looked up by its guards at every later call (no recompile from step to step after warm-up);
* the windowed kernels are one custom op each (:mod:`fastattn.kernels.opaque`); dense attention
  stays SDPA (or FA4's own op) inside the graph; caches are graph inputs and outputs.

How many graphs (:func:`graphs_needed`): compiled whole, one per distinct *step* (every layer's
decision at that step) plus one for a generation's first call (which records its token count);
compiled block by block, one per distinct *layer* decision over the whole plan, plus that one:
all blocks share them. Plans are fixed per generation, so a second generation only replays.
"""

from __future__ import annotations

from typing import Any

from .utils.dynamo import allow_recompiles


def _plan_keys(handle) -> tuple[set, set]:
    """(step keys, layer keys) of the handle's plan: what a compiled transformer (whole, or block
    by block) guards on at each call; the generation's first call is a key of its own."""
    state, plan = handle.state, handle.state.plan
    if plan is None:
        return set(), set()
    family = type(state).__name__
    rows = [tuple(state.plan_layer_keys(s)) for s in range(plan.num_steps)]
    steps = {(family, row) for row in rows} | {(family, "first", rows[0])}
    layers = {(family, key) for row in rows for key in row} | {(family, "first", rows[0][0])}
    return steps, layers


def graphs_needed(handle) -> dict[str, int]:
    """Graphs a compiled transformer builds for the handle's plan: ``{"whole": n, "blocks": m}``.
    Compiled whole: one per distinct step plus one for a generation's first call; compiled block
    by block: one per distinct layer decision over the whole plan plus that one, shared by all
    blocks. A CFG pipeline that runs its branches as separate calls reuses them for the second
    branch, and later generations reuse them all."""
    steps, layers = _plan_keys(handle)
    return {"whole": len(steps), "blocks": len(layers)}


# Every key a plan applied in this process can have compiled: dynamo keeps the graphs of earlier
# plans (and of the unmodified model), so the limit covers their union, not one plan's count.
_seen_steps: set = set()
_seen_layers: set = set()
UNMODIFIED = 2  # graphs of the model's own processors (before fastattn, after removal), with a margin


def allow_plan_recompiles(handle) -> int:
    """Raise dynamo's recompile limit to cover the handle's plan and every plan applied before
    it in this process (:func:`allow_recompiles`); returns the limit asked for."""
    steps, layers = _plan_keys(handle)
    _seen_steps.update(steps)
    _seen_layers.update(layers)
    needed = max(len(_seen_steps), len(_seen_layers)) + UNMODIFIED
    allow_recompiles(needed)
    return needed


def compile_blocks(pipe_or_transformer, **compile_kwargs: Any) -> int:
    """Regional compilation: ``block.compile(**compile_kwargs)`` on each of the transformer's
    blocks (those the model adapter names), as diffusers' ``compile_repeated_blocks()`` does for
    models that declare ``_repeated_blocks`` (PixArt and DiT do not). Returns the block count.
    Apply or remove fastattn before or after; the compiled blocks stay."""
    from .models import get_adapter

    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile(transformer)'s wrapper
    blocks = get_adapter(transformer).blocks(transformer)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


__all__ = ["allow_plan_recompiles", "allow_recompiles", "compile_blocks", "graphs_needed"]
