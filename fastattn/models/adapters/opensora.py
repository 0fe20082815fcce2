"""Open-Sora 1.1 (STDiT2): the techniques on its spatial self-attention, as DiTFastAttn evaluated.

Active when the ``opensora`` package is importable; nothing here imports it at module load.
STDiT2's attention modules are not diffusers ``Attention`` layers, so each one is driven
through a :class:`ProcessorSlot` that gives it the ``processor`` / ``set_processor`` interface
of diffusers (installing sets an instance ``forward``; removing deletes it again).

The interface relied on, checked when the adapter is used (:func:`check_interface`):

- the transformer: class ``STDiT2`` from a module under ``opensora.``, with ``blocks`` (one
  ``STDiT2Block`` per layer), ``config.patch_size`` (``(1, 2, 2)``: the token grid is read from
  the ``[B, C, T, H, W]`` latent), ``y_embedder.y_embedding`` (the null caption) and
  ``forward(x, timestep, y, ...)``;
- each block: ``attn`` (spatial self-attention over a frame's tokens, ``(B·T, S, C)``) and
  ``attn_temp`` (temporal, left untouched);
- each ``attn``: ``qkv`` (one Linear C -> 3C), ``num_heads``, ``head_dim``, ``q_norm``,
  ``k_norm``, ``rope`` (bool; ``rotary_emb`` when true), ``proj``, ``proj_drop``, and
  ``forward(x)``. The order of the rotary embedding and the q/k norms follows the module:
  v1.2 says it in ``qk_norm_legacy`` (rotary first when true); v1.1.0 has no such attribute
  and always applies the rotary embedding first.

The CFG layout comes from each call's batch, not from the model: Open-Sora 1.1's IDDPM sampler
batches [conditional, unconditional] (``forward_with_cfg``), its dpm-solver sampler
[unconditional, conditional]; the half whose captions are the null caption is the unconditional
one. Both call ``model.forward`` directly; the step counter counts such calls too
(see :mod:`fastattn.hooks`). Supported: Open-Sora v1.1.0 (tag ``v1.1.0``) with either sampler.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...attention_io import AttentionIO
from .base import ModelAdapter, call_argument, halves_equal, latents_of, order_of_null_half

BLOCK_ATTRS = ("attn", "attn_temp")
ATTENTION_ATTRS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "rope", "proj", "proj_drop")


def check_interface(transformer: nn.Module) -> None:
    """Raise one line naming what differs from the STDiT2 interface this adapter relies on."""
    if importlib.util.find_spec("opensora") is None:
        raise ValueError("STDiT2 needs the Open-Sora package importable (`opensora`, Open-Sora 1.1); it is not installed")
    module = type(transformer).__module__
    if not module.startswith("opensora."):
        raise ValueError(f"STDiT2 class comes from {module!r}, expected a module of the opensora package")
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError("STDiT2 interface: expected a non-empty ModuleList 'blocks' (installed opensora differs)")
    patch = getattr(getattr(transformer, "config", None), "patch_size", None)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 3):
        raise ValueError(f"STDiT2 interface: expected config.patch_size (t, h, w), got {patch!r} "
                         "(installed opensora differs)")
    if not isinstance(getattr(getattr(transformer, "y_embedder", None), "y_embedding", None), torch.Tensor):
        raise ValueError("STDiT2 interface: expected y_embedder.y_embedding, the null caption "
                         "(installed opensora differs)")
    for i, block in enumerate(blocks):
        missing = [a for a in BLOCK_ATTRS if not hasattr(block, a)]
        missing += [f"attn.{a}" for a in ATTENTION_ATTRS if hasattr(block, "attn") and not hasattr(block.attn, a)]
        if missing:
            raise ValueError(f"STDiT2 interface: blocks[{i}] lacks {', '.join(missing)} (installed opensora differs)")
        attn = block.attn
        dim = attn.num_heads * attn.head_dim
        if attn.qkv.out_features != 3 * dim:
            raise ValueError(f"STDiT2 interface: blocks[{i}].attn.qkv gives {attn.qkv.out_features} features, "
                             f"expected 3 x {dim}")


class NativeForward:
    """The module's own forward, in the role of diffusers' original processor."""

    def __call__(self, slot, hidden_states, *args, **kwargs):
        return type(slot.module).forward(slot.module, hidden_states)


class _Installed:
    """The instance forward that routes a module's calls through its processor."""

    def __init__(self, slot: "ProcessorSlot", processor):
        self.slot, self.processor = slot, processor

    def __call__(self, x):
        return self.processor(self.slot, x)


class ProcessorSlot:
    """diffusers' processor interface for one STDiT2 attention module; holds no state itself."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.heads = module.num_heads

    @property
    def processor(self):
        installed = self.module.__dict__.get("forward")
        return installed.processor if isinstance(installed, _Installed) else NativeForward()

    def set_processor(self, processor) -> None:
        if isinstance(processor, NativeForward):
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = _Installed(self, processor)


def fused_qkv(slot, x: torch.Tensor, encoder_hidden_states=None, rotary=None):
    """STDiT2's fused qkv projection, q/k norms and optional rotary (``slot.module``: the attention)."""
    attn = slot.module
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    # v1.2 names the order in qk_norm_legacy; v1.1.0 has no such attribute and rotates first
    rotary_first = getattr(attn, "qk_norm_legacy", True)
    if attn.rope and rotary_first:
        q, k = attn.rotary_emb(q), attn.rotary_emb(k)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope and not rotary_first:
        q, k = attn.rotary_emb(q), attn.rotary_emb(k)
    return q, k, v


def fused_out(slot, o: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, encoder_hidden_states=None):
    b, heads, n, d = o.shape
    attn = slot.module
    return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(b, n, heads * d).to(dtype)))


STDIT_FUSED = AttentionIO("stdit_fused", fused_qkv, fused_out)  # one fused qkv Linear


@dataclass(frozen=True)
class OpenSoraAdapter(ModelAdapter):
    class_name: str = "STDiT2"
    cond_first: bool = True  # unused: cfg_layout reads the order from the captions of each call
    blocks_attr: str = "blocks"
    io: AttentionIO = STDIT_FUSED  # fused qkv, q/k norms and optional rotary, in the module's order

    def attention_layers(self, transformer: nn.Module) -> list[ProcessorSlot]:
        check_interface(transformer)
        return [ProcessorSlot(block.attn) for block in transformer.blocks]

    def cfg_layout(self, transformer: nn.Module, args, kwargs) -> str | None:
        """Which half of the batch carries the null caption (``y_embedder.y_embedding``); None
        when neither does (not a CFG batch, or one whose layout cannot be known)."""
        if not halves_equal(latents_of(args, kwargs)):
            return None
        y = call_argument(transformer, args, kwargs, "y")  # [B, 1, tokens, C]
        if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[0] % 2:
            return None
        null = transformer.y_embedder.y_embedding.to(y.dtype)
        if y.shape[2:] != null.shape:
            return None
        half = y.shape[0] // 2
        return order_of_null_half(*(torch.equal(part, null.expand_as(part)) for part in (y[:half, 0], y[half:, 0])))

    def dimensions(self, slot: ProcessorSlot) -> tuple[int, int, int]:
        attn = slot.module
        return int(attn.num_heads), int(attn.head_dim), int(attn.qkv.in_features)

    @staticmethod
    def sample(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else ModelAdapter.sample(output)
