"""Transformer-block FLOPs actually executed, counted by forward hooks while a pipeline runs.

Whatever skips work (a block cache returning a cached residual, PAB or TaylorSeer returning an
attention output without running it, FasterCache halving the batch, fastattn's AST / ASC / window
attention), only what runs is counted: every ``nn.Linear`` inside the blocks adds ``2 * rows * in *
out`` when it runs, and every attention layer whose query projection runs adds its score and value
products, ``4 * batch * inner_dim * pairs`` (as :func:`fastattn.flops.core_flops`): ``pairs`` is
queries x keys (text given separately is the keys of a cross-attention, and joins queries and keys
where it has its own projections: FLUX's and SD3's joint attention), or for a fastattn layer what its last call ran (the window's pairs, plus them on a
WA-RS refresh: :func:`fastattn.layerwise.flops.method_cost`'s rule). Only what runs inside a block's forward
counts (DiT's output layer calls block 0's embedding from outside). A multiply-add is 2 FLOPs; norms,
activations and the softmax are not counted. ``attention`` is the attention layers' part
(projections and products), as the paper's "Attn FLOPs".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastattn.flops import core_flops
from fastattn.layerwise.flops import window_pair_count
from fastattn.models import get_adapter


@dataclass
class Flops:
    total: float = 0.0  # every block FLOP executed
    attention: float = 0.0  # the attention layers' share of it

    def to_dict(self) -> dict:
        return {"flops": self.total, "attention_flops": self.attention}


def _attention_modules(block: nn.Module) -> list[nn.Module]:
    """The attention layers of a block: modules with q / k / v projections (FLUX's single-stream
    attention has no output projection: the block's own takes its output)."""
    return [m for m in block.modules() if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("to_q", "to_k", "to_v"))]


def _joint(attn: nn.Module) -> bool:
    """Text and image attend together (MMDiT: the text has its own projections), not text as keys."""
    return isinstance(getattr(attn, "add_q_proj", None), nn.Linear)


class BlockLinearHooks:
    """Calls ``on_linear(block_index, linear, args)`` for every ``nn.Linear`` that runs inside the
    forward of one of the adapter's blocks, from installation until :meth:`remove`. What ran is read
    from the linears, not from the blocks' calls: diffusers' cache hooks replace a block's forward,
    so the block is called even where it returns a cached residual. A linear called from outside a
    block's forward does not count (DiT's output layer calls block 0's embedding)."""

    def __init__(self, transformer: nn.Module, on_linear: Callable[[int, nn.Linear, tuple], None]):
        self._on_linear = on_linear
        self._in_block = 0  # > 0 while a block's forward runs
        self._hooks: list = []
        for index, block in enumerate(get_adapter(transformer).blocks(transformer)):
            self._hooks.append(block.register_forward_pre_hook(self._enter_block))
            self._hooks.append(block.register_forward_hook(self._leave_block))
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    self._hooks.append(module.register_forward_hook(self._ran(index)))

    def _enter_block(self, module, args):
        self._in_block += 1

    def _leave_block(self, module, args, output):
        self._in_block -= 1

    def _ran(self, index: int):
        def hook(module: nn.Linear, args, output):
            if self._in_block:
                self._on_linear(index, module, args)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class BlockFlopCounter:
    """Counts into :attr:`flops` from installation until :meth:`remove`."""

    def __init__(self, transformer: nn.Module):
        self.flops = Flops()
        self._hooks: list = []
        self._queries_keys: dict[int, tuple[int, int]] = {}  # attention module id -> (queries, keys) of its last call
        self._attention_linears: set[int] = set()
        for block in get_adapter(transformer).blocks(transformer):
            for attn in _attention_modules(block):
                self._attention_linears |= {id(m) for m in attn.modules() if isinstance(m, nn.Linear)}
                self._hooks.append(attn.register_forward_pre_hook(self._read_lengths, with_kwargs=True))
                # the query projection runs exactly where the products do (a cached output runs neither)
                self._hooks.append(attn.to_q.register_forward_hook(self._core_counter(attn)))
        self._linears = BlockLinearHooks(transformer, self._count_linear)

    def _count_linear(self, block: int, module: nn.Linear, args) -> None:
        rows = args[0].numel() // module.in_features
        flops = 2.0 * rows * module.in_features * module.out_features
        self.flops.total += flops
        if id(module) in self._attention_linears:
            self.flops.attention += flops

    def _read_lengths(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 3:
            has_context = isinstance(context, torch.Tensor) and context.ndim == 3
            if has_context and _joint(module):
                tokens = hidden.shape[1] + context.shape[1]
                self._queries_keys[id(module)] = (tokens, tokens)
            else:
                self._queries_keys[id(module)] = (hidden.shape[1], (context if has_context else hidden).shape[1])

    def _core_counter(self, attn: nn.Module):
        def count(query_proj: nn.Linear, args, output):
            batch = args[0].shape[0]
            queries, keys = self._queries_keys[id(attn)]
            flops = core_flops(batch, attn.heads, query_proj.out_features // attn.heads, self._pairs(attn, queries, keys))
            self.flops.total += flops
            self.flops.attention += flops
        return count

    @staticmethod
    def _pairs(attn: nn.Module, queries: int, keys: int) -> int:
        executed = getattr(attn.processor, "executed", None)  # a fastattn layer: what its call ran
        if executed is None:
            return queries * keys
        method, refresh = executed
        state = attn.processor.state
        window = window_pair_count(queries, state.window_size, state.window_shape)
        pairs = window if method.uses_window and not refresh else queries * keys
        return pairs + window if refresh else pairs

    def remove(self) -> None:
        self._linears.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
