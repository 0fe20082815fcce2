"""``fastattn.describe``: what a model is to fastattn, before any plan exists.

How many layers a plan needs, what each layer is (its attention kind and window geometry), which
plan families it accepts (and why not the others), its heads, and the token grid at a given
resolution. Everything is read from the adapter's :class:`ModelDescription`; nothing is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .apply import REFUSALS, refusal
from .hooks import split_pipeline
from .layerwise.plan import LayerPlan
from .models import get_adapter
from .plan import CompressionPlan


@dataclass(frozen=True)
class LayerInfo:
    kind: str  # 'self', 'joint' (text + image streams) or 'single' (an already joint sequence)
    geometry: str  # where a window lives: 'spatial', 'temporal' or 'full3d'
    core: str = "sdpa"  # 'sdpa': one attention call a window replaces; 'opaque' (linear attention): no window


@dataclass(frozen=True)
class ModelInfo:
    class_name: str
    num_layers: int  # what a plan's num_layers must be
    layers: tuple[LayerInfo, ...]  # in execution order: a plan's layer index
    families: tuple[str, ...]  # the plan types it accepts ('LayerPlan', 'HeadPlan')
    refused: tuple[tuple[str, str], ...]  # (plan type, why not) for the others
    num_heads: int
    head_dim: int
    model_dim: int
    timestep_arg: str  # the forward argument the step counter reads
    cfg_batched: bool  # its pipelines batch both CFG branches in one call (what ASC shares across)
    token_grid: tuple[int, int, int] | None  # (frames, rows, cols) at the resolution asked; None: unknown
    num_tokens: int | None  # the image tokens one layer attends over at that resolution

    def all_full(self, num_steps: int) -> CompressionPlan:
        """The plan of the model's first accepted family that leaves every layer full."""
        if not self.families:
            raise ValueError(f"{self.class_name} accepts no plan family: {'; '.join(r for _, r in self.refused)}")
        if self.families[0] == "LayerPlan":
            return LayerPlan.all_full(num_steps, self.num_layers)
        return CompressionPlan.from_heads([[["full"] * self.num_heads] * self.num_layers] * num_steps)


def _latent_size(pipe, height, width, num_frames) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of the latent: pixels through a pipeline's VAE factors, or as given
    for a bare transformer (then the sizes are the latent's)."""
    if height is None or width is None:
        return None
    if pipe is None:
        return (num_frames or 1, height, width)
    vae = getattr(pipe, "vae", None)
    default = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None and hasattr(
        getattr(vae, "config", None), "block_out_channels") else 8
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or default
    temporal = getattr(pipe, "vae_scale_factor_temporal", 1)
    frames = 1 if num_frames is None else (num_frames - 1) // temporal + 1
    return (frames, height // spatial, width // spatial)


def describe(pipe_or_transformer, height: int | None = None, width: int | None = None,
             num_frames: int | None = None) -> ModelInfo:
    """What ``pipe_or_transformer`` is to fastattn (:class:`ModelInfo`). ``height`` / ``width``
    (and ``num_frames`` for video) give the token grid: in pixels for a pipeline, in latent
    elements for a bare transformer. Raises one line for a model fastattn has no adapter for."""
    transformer, _ = split_pipeline(pipe_or_transformer)
    pipe = None if pipe_or_transformer is transformer else pipe_or_transformer
    adapter = get_adapter(transformer)
    d = adapter.description(transformer)
    # head-wise first where it serves: the papers' family for MMDiTs (what all_full then builds)
    reasons = {plan_type.__name__: refusal(plan_type, d) for plan_type in sorted(REFUSALS, key=lambda t: t is LayerPlan)}
    latent, patch = _latent_size(pipe, height, width, num_frames), d.patch_size
    grid = None if latent is None or patch is None else tuple(-(-n // p) for n, p in zip(latent, patch))
    per_layer = {"spatial": None if grid is None else grid[1] * grid[2], "temporal": None if grid is None else grid[0],
                 "full3d": None if grid is None else grid[0] * grid[1] * grid[2]}
    return ModelInfo(
        class_name=d.class_name, num_layers=len(d.layers),
        layers=tuple(LayerInfo(layer.kind, layer.geometry, layer.core) for layer in d.layers),
        families=tuple(name for name, why in reasons.items() if why is None),
        refused=tuple((name, why) for name, why in reasons.items() if why is not None),
        num_heads=d.num_heads, head_dim=d.head_dim, model_dim=d.model_dim, timestep_arg=d.timestep_arg,
        cfg_batched=d.cfg_batched,
        token_grid=grid, num_tokens=per_layer[d.layers[0].geometry] if d.layers else None)


__all__ = ["LayerInfo", "ModelInfo", "describe"]
