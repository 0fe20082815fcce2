"""parallel.context: {ulysses: U, ring: R}, diffusers' context parallelism inside groups of U x R
ranks, checked before any model is built; one-line errors naming the key.

Under torchrun a world of W ranks forms W / (U x R) data-parallel groups; each group makes its share
of the samples with the transformer's sequence split over its U x R ranks (experiments/infra/context_groups.py).
diffusers' splitter shards every input its ``_cp_plan`` names into U x R equal pieces (FLUX: the image
and the text tokens) and Ulysses' all-to-all hands each rank heads / U heads, so those must divide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..models.architectures import ARCHITECTURES
from .app import ConfigError

KEY = "parallel.context"
# The transformer class diffusers builds for each family (the harness's loaders): its _cp_plan says
# whether diffusers can split it.
TRANSFORMER_CLASSES = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
                       "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                       "latte": "LatteTransformer3DModel", "wan": "WanTransformer3DModel"}
# Released checkpoints' shapes where the config does not build the model (tiny: model.tiny gives them).
CHECKPOINT_SHAPES = {"flux": ARCHITECTURES["flux_dev"]}  # every FLUX.1 transformer: 24 heads, 512 T5 tokens
LAYERWISE_SEARCHES = ("greedy", "fast", "budget")


@dataclass(frozen=True)
class ContextDegrees:
    ulysses: int = 1
    ring: int = 1

    @property
    def degree(self) -> int:
        """Ranks in one context group."""
        return self.ulysses * self.ring

    @property
    def on(self) -> bool:
        return self.degree > 1

    def __str__(self) -> str:
        return f"ulysses {self.ulysses} x ring {self.ring} = {self.degree}"


def context_degrees(cfg: DictConfig) -> ContextDegrees:
    """parallel.context's degrees (both 1 where the key is absent: jobs composed before it existed)."""
    context = (cfg.get("parallel") or {}).get("context") or {}
    unknown = sorted(set(context) - {"ulysses", "ring"})
    if unknown:
        raise ConfigError(f"{KEY}: unknown key {unknown[0]!r} (it takes ulysses and ring)")
    degrees = {}
    for name in ("ulysses", "ring"):
        value = context.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{KEY}.{name} must be an integer >= 1, got {value!r}")
        degrees[name] = value
    return ContextDegrees(**degrees)


def check_context(cfg: DictConfig, world_size: int) -> ContextDegrees:
    """The degrees, checked against the ranks this job was launched with (``world_size``), the model,
    its sequence and the plan; returns them."""
    degrees = context_degrees(cfg)
    if not degrees.on:
        return degrees
    if world_size == 1:
        raise ConfigError(f"{KEY}: {degrees} splits each sample over {degrees.degree} ranks, but this is one "
                          f"process: launch it with torchrun --nproc_per_node <a multiple of {degrees.degree}>")
    if world_size % degrees.degree:
        raise ConfigError(f"{KEY}: {degrees} does not divide the {world_size} ranks (torchrun --nproc_per_node): "
                          f"launch a multiple of {degrees.degree}")
    check_context_model(cfg.model, degrees)
    check_context_plan(cfg, degrees)
    if cfg.get("cuda_graphs"):
        raise ConfigError(f"{KEY}: cuda_graphs=true is not run under context parallelism (its collectives are not "
                          "captured); set cuda_graphs=false")
    if degrees.ring > 1 and not torch.cuda.is_available():
        raise ConfigError(f"{KEY}: ring={degrees.ring} runs diffusers' ring for the plan's full layers, which needs "
                          "each attention call's log-sum-exp (the cuDNN backend, CUDA only); use ulysses here")
    if torch.accelerator.device_count() < 1:
        raise ConfigError(f"{KEY}: diffusers places each rank on one of torch.accelerator's devices, and torch "
                          "sees none")
    return degrees


def has_context_plan(family: str) -> bool:
    """Whether diffusers can split ``family``'s transformer (its class has a ``_cp_plan``)."""
    import diffusers

    name = TRANSFORMER_CLASSES.get(family)
    return name is not None and getattr(getattr(diffusers, name, None), "_cp_plan", None) is not None


def check_context_model(model: DictConfig, degrees: ContextDegrees) -> None:
    """The model has a context-parallel plan, its heads split over Ulysses and its sequences over the group."""
    if not has_context_plan(model.family):
        able = ", ".join(f for f in TRANSFORMER_CLASSES if has_context_plan(f))
        raise ConfigError(f"{KEY}: model {model.name} ({TRANSFORMER_CLASSES.get(model.family, model.family)}) has "
                          f"no context-parallel plan (diffusers `_cp_plan`); use {KEY} with the families {able}")
    refusal = shape_refusal(degrees, *context_shape(model), f"model {model.name}")
    if refusal:
        raise ConfigError(f"{KEY}: {refusal}; pick degrees or a resolution that do")


def shape_refusal(degrees: ContextDegrees, heads: int, sequences: dict[str, int], owner: str) -> str | None:
    """Why ``degrees`` cannot split a model of ``heads`` heads and these token counts; None if they can."""
    if heads % degrees.ulysses:
        return (f"ulysses={degrees.ulysses} does not divide {owner}'s {heads} attention heads (Ulysses gives each "
                "rank heads / ulysses of them)")
    for name, tokens in sequences.items():
        if tokens % degrees.degree:
            return (f"{degrees} does not divide {owner}'s {tokens} {name} tokens (diffusers splits them into "
                    f"{degrees.degree} equal shards)")
    return None


def context_shape(model: DictConfig) -> tuple[int, dict[str, int]]:
    """Attention heads and the token counts diffusers splits, from the config alone (FLUX: the
    pipeline packs 2x2 latents per image token and pads the prompt to its text length)."""
    if model.family != "flux":
        raise ConfigError(f"{KEY}: the main job splits FLUX models only, got model.family={model.family!r}")
    if model.get("tiny"):
        heads, text, latent_scale = model.tiny.num_heads, model.tiny.text_len, 1  # the tiny VAE keeps the size
    else:
        spec = CHECKPOINT_SHAPES["flux"]
        heads, text, latent_scale = spec["config"]["num_attention_heads"], spec["text_len"], spec["latent_scale"]
    image = (int(model.resolution) // latent_scale // 2) ** 2
    return int(heads), {"image": image, "text": int(text)}


def check_context_plan(cfg: DictConfig, degrees: ContextDegrees) -> None:
    """Head-wise plans run under Ulysses alone (each head-wise layer makes the exchange itself, for
    the rank's heads); under ring a head-wise search or plan file is refused here."""
    from fastattn.headwise.plan import HeadPlan

    from .config import load_plan_file

    if degrees.ring == 1:
        return
    if cfg.get("plan_path"):
        if isinstance(load_plan_file(cfg.plan_path), HeadPlan):
            raise ConfigError(f"{KEY}: plan_path {cfg.plan_path} is a head-wise plan, which fastattn runs under "
                              "Ulysses alone (ring=1); give a layer-wise plan for the ring")
        return
    algorithm = (cfg.get("search") or {}).get("algorithm", "greedy")
    if algorithm not in LAYERWISE_SEARCHES:
        raise ConfigError(f"{KEY}: search={algorithm} makes head-wise plans, which fastattn runs under Ulysses "
                          f"alone (ring=1); use search={' | '.join(LAYERWISE_SEARCHES)} (layer-wise plans) with the ring")
