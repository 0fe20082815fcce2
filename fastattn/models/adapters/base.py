"""What fastattn needs to know about one transformer architecture.

An adapter names the self-attention layers the techniques act on (one per block, so a layer
index is also a block index), says how its pipelines run classifier-free guidance, reads each
call's CFG layout and token grid from the call's inputs, and describes each layer (its
attention kind, window geometry and q/k/v layout) in a :class:`ModelDescription`. It builds
nothing: each family turns the description into its processors. Every method here has a
default; an architecture overrides what differs. Nothing else in fastattn probes an adapter for
optional attributes.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...attention_io import SELF, AttentionIO
from ...family import COND_FIRST, UNCOND_FIRST
from .description import AttentionLayer, ModelDescription


def latents_of(args, kwargs) -> torch.Tensor | None:
    """The latent input of a transformer call: its first positional argument or ``hidden_states``."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return x if isinstance(x, torch.Tensor) else None


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_argument(transformer: nn.Module, args, kwargs, name: str) -> Any:
    """The value a transformer call passes for the forward parameter ``name`` (None if absent)."""
    try:
        return _forward_signature(type(transformer)).bind_partial(transformer, *args, **kwargs).arguments.get(name)
    except TypeError:
        return kwargs.get(name)


def halves_equal(x: torch.Tensor | None) -> bool:
    """Whether a batch is two copies of the same latents: how every CFG-batch pipeline calls
    the model (``torch.cat([latents] * 2)``), and what two different samples never are."""
    if x is None or x.ndim < 1 or x.shape[0] < 2 or x.shape[0] % 2:
        return False
    half = x.shape[0] // 2
    return bool(torch.equal(x[:half], x[half:]))


def order_of_null_half(first_is_null: bool, second_is_null: bool) -> str | None:
    """The CFG layout of a batch whose halves are (or are not) all the null condition: the
    other half is the conditional one; None when neither or both are."""
    if second_is_null and not first_is_null:
        return COND_FIRST
    if first_is_null and not second_is_null:
        return UNCOND_FIRST
    return None


@dataclass(frozen=True)
class ModelAdapter:
    class_name: str
    cond_first: bool  # in a CFG batch: DiT pipelines put the conditional half first; PixArt the unconditional
    blocks_attr: str = "transformer_blocks"
    attention_attr: str = "attn1"  # self-attention; cross-attention (attn2) stays untouched
    # True: the pipeline puts both CFG branches in one batch (DiT, PixArt, SD3, Latte);
    # False: it runs them as separate calls (FLUX true CFG, Wan), so no call holds a CFG batch.
    cfg_batched: bool = True
    io: AttentionIO = SELF  # the layers' q/k/v and output projections (fastattn.attention_io)
    timestep_arg: str = "timestep"  # the forward argument that carries the call's timestep

    # -- layers -----------------------------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(getattr(transformer, self.blocks_attr))

    def attention_layers(self, transformer: nn.Module) -> list[nn.Module]:
        layers = [getattr(b, self.attention_attr) for b in self.blocks(transformer)]
        for i, attn in enumerate(layers):
            self._check_attention(attn, i)
        return layers

    def _check_attention(self, attn: nn.Module, index: int) -> None:
        # The compressed paths re-implement the projections of diffusers' AttnProcessor2_0 for
        # plain self-attention; refuse layouts they would get wrong rather than guess.
        for attr in ("group_norm", "spatial_norm"):
            if getattr(attn, attr, None) is not None:
                raise ValueError(f"layer {index}: attention with {attr} is not supported by fastattn")
        if getattr(attn, "is_cross_attention", False):
            raise ValueError(f"layer {index}: {self.attention_attr} is cross-attention, expected self-attention")

    def layer_kinds(self, transformer: nn.Module) -> list[str]:
        """The geometry of each layer's window: 'spatial' (image tokens), 'temporal', 'full3d'."""
        return ["spatial"] * len(self.blocks(transformer))

    def attention_kinds(self, transformer: nn.Module) -> list[str]:
        """What each layer attends over: 'self', 'joint' or 'single' (description.ATTENTION_KINDS)."""
        return ["self"] * len(self.blocks(transformer))

    def attention_cores(self, transformer: nn.Module) -> list[str]:
        """How each layer attends (description.ATTENTION_CORES): one replaceable SDPA call."""
        return ["sdpa"] * len(self.blocks(transformer))

    # -- each call ----------------------------------------------------------------------------
    def cfg_layout(self, transformer: nn.Module, args, kwargs) -> str | None:
        """Where the conditional half of this call's batch sits (COND_FIRST / UNCOND_FIRST), or
        None when the batch does not hold both CFG branches (guidance 1, or separate calls)."""
        if not self.cfg_batched or not halves_equal(latents_of(args, kwargs)):
            return None
        return COND_FIRST if self.cond_first else UNCOND_FIRST

    def patch_size(self, transformer: nn.Module) -> tuple[int, int, int] | None:
        """Patch size over (frames, rows, cols) of the latent, or None for token inputs."""
        patch = getattr(transformer.config, "patch_size", None)
        if isinstance(patch, int):
            return (getattr(transformer.config, "patch_size_t", None) or 1, patch, patch)
        if isinstance(patch, (tuple, list)) and len(patch) == 3:
            return tuple(int(p) for p in patch)
        return None

    def token_grid(self, transformer: nn.Module, args, kwargs) -> tuple[int, int, int] | None:
        """(frames, rows, cols) of this call's tokens, from the latent's shape and the patch size:
        [B, C, H, W], [B, C, F, H, W] or [B, F, C, H, W] (a partial patch at an edge is padded into a
        whole one, as Open-Sora does); None where the input is already a token sequence (FLUX)."""
        x, patch = latents_of(args, kwargs), self.patch_size(transformer)
        if x is None or patch is None or x.ndim not in (4, 5):
            return None
        # [B, F, C, H, W] where the channels come second (CogVideoX), else [B, C, F, H, W]
        frames_first = x.ndim == 5 and x.shape[2] == getattr(transformer.config, "in_channels", None) != x.shape[1]
        sizes = (x.shape[1 if frames_first else 2] if x.ndim == 5 else 1, x.shape[-2], x.shape[-1])
        return tuple(-(-n // p) for n, p in zip(sizes, patch))

    def image_tokens(self, transformer: nn.Module, args, kwargs, grid: tuple[int, int, int] | None) -> int | None:
        """The call's image tokens: the grid's, or the length of a packed [batch, tokens, channels]
        latent (FLUX); None where neither says."""
        if grid is not None:
            return grid[0] * grid[1] * grid[2]
        x = latents_of(args, kwargs)
        return int(x.shape[1]) if x is not None and x.ndim == 3 else None

    # -- describing ---------------------------------------------------------------------------
    def description(self, transformer: nn.Module) -> ModelDescription:
        """Every fact about ``transformer`` the families build their processors from."""
        attention = self.attention_layers(transformer)
        layers = tuple(AttentionLayer(kind, geometry, self.io, core) for kind, geometry, core in
                       zip(self.attention_kinds(transformer), self.layer_kinds(transformer),
                           self.attention_cores(transformer), strict=True))
        if len(layers) != len(attention):
            raise ValueError(f"{self.class_name}: {len(attention)} attention layers, {len(layers)} described")
        if not attention:  # every attention module read as cross-attention: nothing to act on
            raise ValueError(f"{self.class_name}: no self-, joint or single attention layer (every attention module "
                             "with a processor is cross-attention)")
        heads, head_dim, model_dim = self.dimensions(attention[0])
        return ModelDescription(type(transformer).__name__, layers, heads, head_dim, model_dim,
                                cfg_batched=self.cfg_batched, cond_first=self.cond_first,
                                patch_size=self.patch_size(transformer), timestep_arg=self.timestep_arg)

    def dimensions(self, attn: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, model_dim) of an attention layer."""
        heads = int(attn.heads)
        return heads, int(attn.to_q.out_features // heads), int(attn.to_q.in_features)

    def describe(self, transformer: nn.Module) -> dict[str, Any]:
        """The facts plans are checked against (:meth:`ModelDescription.facts`)."""
        return self.description(transformer).facts()

    @staticmethod
    def sample(output: Any) -> torch.Tensor:
        """The predicted tensor from a transformer return value (tuple or output dataclass)."""
        if isinstance(output, torch.Tensor):
            return output
        first = output[0] if isinstance(output, (tuple, list)) else output.sample
        # a list of per-sample outputs (Z-Image's variable-size samples), stacked where they match
        return torch.stack(list(first)) if isinstance(first, (tuple, list)) else first
