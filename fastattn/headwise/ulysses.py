"""Head-wise plans under diffusers' Ulysses context parallelism: whole sequences, a share of the heads.

Under ``ContextParallelConfig(ulysses_degree=U)`` each rank holds a shard of every sequence (its
text shard and its image shard) and every head. diffusers' own processors exchange them inside
their attention dispatch; a head-wise layer projects q, k and v itself, so it makes the same
exchange itself (:func:`to_heads`): one all-to-all gives each rank whole sequences for its H/U
heads (rank u: heads u·H/U to (u+1)·H/U - 1), put in the order the unsplit model has them (every
rank's text shard, then every rank's image shard, or image first where the model puts it so)
so that the plan's methods for those heads, their arrow and their caches are the single-process
ones; :func:`to_sequence` sends the output back.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..context_parallel import Group


@functools.lru_cache(maxsize=16)  # one per layout: built once, no per-call host sync
def _model_order(local_len: int, image_start: int, image_len: int, world: int, device) -> torch.Tensor:
    """Indices of the gathered sequence (each rank's local tokens, rank after rank) in the model's
    order: text first where each shard has its text first, else image first."""
    image = torch.arange(image_start, image_start + image_len, device=device)
    text = torch.cat([torch.arange(image_start, device=device),
                      torch.arange(image_start + image_len, local_len, device=device)])
    chunks = torch.arange(world, device=device)[:, None] * local_len
    images, texts = (chunks + local[None, :] for local in (image, text))
    parts = (texts, images) if image_start > 0 else (images, texts)
    return torch.cat([p.flatten() for p in parts])


def to_heads(x: torch.Tensor, ulysses: Group, image_start: int, image_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, heads, local tokens, dim] -> [batch, heads / U, every token, dim] of this rank's
    heads in the model's order, and that order (for :func:`to_sequence`)."""
    batch, heads, tokens, dim = x.shape
    send = x.reshape(batch, ulysses.world, heads // ulysses.world, tokens, dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)  # rank u's tokens of this rank's heads
    gathered = received.permute(1, 2, 0, 3, 4).reshape(batch, heads // ulysses.world, ulysses.world * tokens, dim)
    order = _model_order(tokens, image_start, image_len, ulysses.world, x.device)
    return gathered.index_select(2, order), order


def to_sequence(y: torch.Tensor, ulysses: Group, order: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_heads`: [batch, heads / U, every token, dim] in the model's order
    -> [batch, heads, this rank's tokens, dim]."""
    batch, heads, tokens, dim = y.shape
    gathered = torch.empty_like(y).index_copy_(2, order, y)
    local = tokens // ulysses.world
    send = gathered.reshape(batch, heads, ulysses.world, local, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)  # this rank's tokens of rank u's heads
    return received.transpose(0, 1).reshape(batch, ulysses.world * heads, local, dim)


def rank_heads(ulysses: Group, heads: int) -> slice:
    """The heads this rank attends after :func:`to_heads`."""
    share = heads // ulysses.world
    return slice(ulysses.rank * share, (ulysses.rank + 1) * share)


__all__ = ["rank_heads", "to_heads", "to_sequence"]
