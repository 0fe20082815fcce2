"""The adapter of a transformer with no hand-written one, read from its diffusers attention modules.

Every diffusers ``Attention`` / ``AttentionModuleMixin`` module, and any other module that holds
a ``processor`` it hands itself to (Mochi's, which has no ``set_processor``), is found in module
order (a block's ``attn1`` before its ``attn2``, blocks in execution order). Cross-attention
(``is_cross_attention``, or a module named as one: ``attn2``, ``*cross*``) attends over the text
and is left alone, unless its name says self-attention (OmniGen's ``self_attn`` is built with a
``cross_attention_dim`` but fed its own tokens). Added k/v projections alone do not make a module
cross-attention: NucleusMoE's projects its own tokens and appends the text's keys, and is refused
at the call where a technique would replace it (:mod:`fastattn.core_call`). A layer with added q
projections is ``joint``; the other layers of a model that has joint ones attend over a sequence
that already holds the text (``single``), and in a model without any they are ``self``. Their
q/k/v layout is :data:`~fastattn.attention_io.WRAPPED`: the layer-wise family runs each layer's
own processor with only its attention core replaced, so rotary embeddings, norms and every
keyword stay the model's. CFG: diffusers' pipelines batch
[unconditional, conditional] (a batch of two equal latent halves), and the timestep argument is
read under the name the forward gives it (``timestep``, ``timesteps`` or ``t``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from torch import nn

from ...attention_io import WRAPPED, AttentionIO
from .base import ModelAdapter

_CROSS_NAMES = ("attn2", "cross", "_to_")  # _to_: LTX-2's audio_to_video_attn, one modality's queries on another's
_SELF_NAMES = ("self",)  # self_attn, self_attention: the name outranks a cross_attention_dim flag
_HEADS_NAMES = ("heads", "num_heads", "n_heads", "num_attention_heads")
_HEAD_DIM_NAMES = ("head_dim", "dim_head")
_QUERY_NAMES = ("to_q", "to_query", "q_proj")  # Kandinsky 5 names its q projection to_query
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_SDPA_NAMES = ("scaled_dot_product_attention", "dispatch_attention_fn")


def diffusers_attention_types() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return (Attention, AttentionModuleMixin)


def holds_processor(module: nn.Module) -> bool:
    """A module outside diffusers' attention classes that runs through a processor object it
    holds (diffusers' convention: ``forward`` calls ``self.processor(self, ...)``)."""
    processor = getattr(module, "processor", None)
    return callable(processor) and not isinstance(processor, nn.Module)


def attention_modules(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module with a processor, in module order."""
    types = diffusers_attention_types()
    return [(name, m) for name, m in transformer.named_modules()
            if (isinstance(m, types) and hasattr(m, "processor")) or holds_processor(m)]


def is_cross(name: str, attn: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if any(n in leaf for n in _SELF_NAMES):
        return False
    return bool(getattr(attn, "is_cross_attention", False)) or any(n in leaf for n in _CROSS_NAMES)


def is_joint(attn: nn.Module) -> bool:
    return getattr(attn, "add_q_proj", None) is not None


def attention_core(processor) -> str:
    """'sdpa' where the processor's code makes a scaled_dot_product_attention call (directly or
    through diffusers' dispatch_attention_fn on its native backend), else 'opaque' (linear
    attention, another backend); read from its source, since nothing else says it before a call."""
    while hasattr(processor, "inner"):  # a fastattn processor applied before: read the model's own
        processor = processor.inner
    if getattr(processor, "_attention_backend", None) not in (None, "native"):
        return "opaque"  # another backend (AnyFlow-FAR's flex block masks) makes no SDPA call
    return _core_of_class(type(processor))


@functools.lru_cache(maxsize=None)  # one source read per processor class, not per layer and apply
def _core_of_class(cls: type) -> str:
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return "sdpa"  # no source to read: the first call refuses what it cannot replace
    return "sdpa" if any(name in source for name in _SDPA_NAMES) else "opaque"


def query_projection(attn: nn.Module) -> tuple[nn.Linear | None, bool]:
    """The module's q projection and whether it is fused with k and v (one Linear, 3x wide)."""
    named = [m for n in _QUERY_NAMES if isinstance(m := getattr(attn, n, None), nn.Linear)]
    if named:
        return named[0], False
    fused = [m for n, m in attn.named_children() if "qkv" in n and isinstance(m, nn.Linear)
             and m.out_features % 3 == 0]
    return (fused[0], True) if fused else (None, False)


@dataclass(frozen=True)
class GenericAdapter(ModelAdapter):
    cond_first: bool = False  # diffusers' CFG pipelines batch [unconditional, conditional]
    io: AttentionIO = WRAPPED

    @classmethod
    def of(cls, transformer: nn.Module) -> "GenericAdapter":
        params = inspect.signature(type(transformer).forward).parameters
        timestep = next((n for n in _TIMESTEP_NAMES if n in params), "timestep")
        return cls(type(transformer).__name__, timestep_arg=timestep)

    def _named_layers(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in attention_modules(transformer) if not is_cross(n, m)]

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The module that holds each layer (a block, replayed whole by the searches)."""
        modules = dict(transformer.named_modules())
        return [modules[n.rsplit(".", 1)[0]] if "." in n else transformer for n, _ in self._named_layers(transformer)]

    def attention_layers(self, transformer: nn.Module) -> list[nn.Module]:
        return [m for _, m in self._named_layers(transformer)]

    def attention_kinds(self, transformer: nn.Module) -> list[str]:
        layers = self.attention_layers(transformer)
        joint = [is_joint(m) for m in layers]
        return ["joint" if j else "single" if any(joint) else "self" for j in joint]

    def attention_cores(self, transformer: nn.Module) -> list[str]:
        return [attention_core(m.processor) for m in self.attention_layers(transformer)]

    def layer_kinds(self, transformer: nn.Module) -> list[str]:
        # the band window runs over the flattened sequence, whatever its geometry
        return ["spatial"] * len(self.attention_layers(transformer))

    def dimensions(self, attn: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, model_dim), read from what the module has: its heads under any of
        :data:`_HEADS_NAMES`, and its q projection (:data:`_QUERY_NAMES`, or a fused ``*qkv*`` Linear: PRX)."""
        heads = next((int(v) for n in _HEADS_NAMES if isinstance(v := getattr(attn, n, None), int)), None)
        q, fused = query_projection(attn)
        if heads is None or q is None:
            raise ValueError(f"{self.class_name}: its attention module {type(attn).__name__} names no heads or q "
                             "projection fastattn can read")
        head_dim = next((int(v) for n in _HEAD_DIM_NAMES if isinstance(v := getattr(attn, n, None), int)),
                        q.out_features // (3 if fused else 1) // heads)
        return heads, head_dim, int(q.in_features)

    def _check_attention(self, attn: nn.Module, index: int) -> None:
        """Nothing to refuse here: the own processor projects (what the core cannot replace is
        refused at the call, :mod:`fastattn.core_call`)."""


def generic_adapter(transformer: nn.Module) -> GenericAdapter | None:
    """The generic adapter of a transformer with diffusers attention modules; None without any."""
    if not any(True for _ in attention_modules(transformer)):
        return None
    return GenericAdapter.of(transformer)
