"""The context-parallel splits benchmark_context times, read and checked before any model is built.

``splits`` lists {ulysses: U, ring: R} (each 1 where absent); null means the three splits of the
whole world W: Ulysses W, ring W, and Ulysses 2 x ring W/2 (where W/2 > 1). Every split must
divide the ranks (the world forms W / (U x R) context groups: experiments/infra/context_groups.py),
Ulysses must divide the model's heads and U x R the token counts diffusers shards (its
``_cp_plan``: Wan's video tokens, FLUX's image and text tokens).
"""

from __future__ import annotations

import torch

from ..infra.app import ConfigError
from ..infra.context_config import ContextDegrees, shape_refusal
from .zoo_shapes import zoo_shape

KEY = "splits"


def default_splits(world: int) -> list[ContextDegrees]:
    mixed = [ContextDegrees(2, world // 2)] if world % 2 == 0 and world >= 4 else []
    return [ContextDegrees(ulysses=world), ContextDegrees(ring=world), *mixed]


def read_splits(splits, world: int) -> list[ContextDegrees]:
    """The splits to time on ``world`` ranks, with one-line errors naming the entry."""
    if splits is None:
        return default_splits(world)
    if not splits:
        raise ConfigError(f"{KEY} must be null or a non-empty list of {{ulysses: U, ring: R}}")
    read = []
    for i, split in enumerate(splits):
        unknown = sorted(set(split) - {"ulysses", "ring"})
        if unknown:
            raise ConfigError(f"{KEY}[{i}]: unknown key {unknown[0]!r} (it takes ulysses and ring)")
        for name in ("ulysses", "ring"):
            value = split.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{KEY}[{i}].{name} must be an integer >= 1, got {value!r}")
        read.append(ContextDegrees(split.get("ulysses", 1), split.get("ring", 1)))
    return read


def split_shape(model: str, size: str) -> tuple[int, dict[str, int]]:
    """The model's attention heads and the token counts diffusers shards, from its config and
    inputs alone (CPU tensors, no model built)."""
    shape = zoo_shape(model, size)
    inputs = shape.inputs(torch.Generator().manual_seed(1))
    heads = shape.config["num_attention_heads"]
    if shape.class_name == "WanTransformer3DModel":
        patch = shape.config["patch_size"]
        grid = [n // p for n, p in zip(inputs["hidden_states"].shape[2:], patch)]
        return heads, {"video": grid[0] * grid[1] * grid[2]}  # its text enters by cross-attention, unsplit
    if shape.class_name == "FluxTransformer2DModel":
        return heads, {"image": inputs["hidden_states"].shape[1], "text": inputs["encoder_hidden_states"].shape[1]}
    raise ConfigError(f"models: {model} ({shape.class_name}) is not one benchmark_context splits (Wan, FLUX)")


def check_splits(splits: list[ContextDegrees], world: int, models, size: str) -> None:
    """Each split against the ranks, each model's heads and token counts."""
    if world == 1:
        raise ConfigError("benchmark_context splits each model over several ranks, but this is one process: launch "
                          "it with torchrun --nproc_per_node N")
    shapes = {m: split_shape(m, size) for m in models}
    for i, degrees in enumerate(splits):
        if not degrees.on:
            raise ConfigError(f"{KEY}[{i}]: {degrees} splits nothing; give ulysses or ring > 1")
        if world % degrees.degree:
            raise ConfigError(f"{KEY}[{i}]: {degrees} does not divide the {world} ranks (torchrun --nproc_per_node)")
        for model, (heads, tokens) in shapes.items():
            refusal = shape_refusal(degrees, heads, tokens, model)
            if refusal:
                raise ConfigError(f"{KEY}[{i}]: {refusal}")


__all__ = ["check_splits", "default_splits", "read_splits", "split_shape"]
