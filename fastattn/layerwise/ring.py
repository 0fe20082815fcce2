"""The layer-wise window under diffusers' ring context parallelism, with a band-aware exchange.

Under ``ContextParallelConfig(ring_degree=N)`` each rank holds one contiguous shard of the image
tokens (and, for a joint model, one shard of the text), and diffusers' ring hands every rank's
K/V shard to every other rank. Full attention needs that; the window does not. Rank r's image
queries sit at global image positions [r·n, (r+1)·n) and see image keys within w of them, so only
the ranks whose shards meet [r·n - w, (r+1)·n - 1 + w] send theirs (:func:`band_sources`: with
w = L/8 on 8 ranks, ranks r-1, r and r+1). Pairs with a text token stay full (the arrow): the
text's K/V, small, is gathered from every rank, and the rows of the text queries, which see every
key, are merged from each rank's attention over its own keys by log-sum-exp (the text queries
travel, the image shards do not).

The processor runs the model's own processor with diffusers' ring switched off
(:func:`local_attention`: its attention calls then see the rank's own q, k, v; with Ulysses as
well, the contiguous chunk its Ulysses group gathers, for a share of the heads, since diffusers
lays the ranks out ring-major), and answers those calls here: :func:`ring_window` (the band
exchange), :func:`ring_refresh` (O and R = O - W from one gather of every shard) and
:func:`ring_full` (full attention: ASC's conditional half, a call with no image pairs).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..context_parallel import Group, ring_group
from ..core_call import Core
from ..kernels.arrow import arrow_tile, tile_radius_of
from ..kernels.attention import shard_window_attention
from ..kernels.video_masks import check_grid, tile_key_range, tile_shape
from ..kernels.masks import window_half_width
from .sequences import Reordered


def _ulysses_only(config):
    """The parallel config with its ring taken out (None where Ulysses is not used either)."""
    context = config.context_parallel_config
    if context.ulysses_degree <= 1:
        return None
    context, config = copy.copy(context), copy.copy(config)
    context.ring_degree = 1  # diffusers' dispatch then runs its Ulysses exchange alone
    config.context_parallel_config = context
    return config


@contextlib.contextmanager
def local_attention(processor):
    """The processor's attention calls without diffusers' ring: each sees the rank's own tokens
    (with Ulysses, its group's gathered chunk), through the native backend's SDPA call, which
    fastattn answers (diffusers' ring itself needs a backend that returns the log-sum-exp: cuDNN).
    Without a ring, nothing changes."""
    if ring_group(processor) is None:
        yield
        return
    config, backend = processor._parallel_config, getattr(processor, "_attention_backend", None)
    processor._parallel_config = _ulysses_only(config)
    if backend is not None:
        processor._attention_backend = "native"
    try:
        yield
    finally:
        processor._parallel_config = config
        if backend is not None:
            processor._attention_backend = backend


@dataclass(frozen=True)
class Band:
    """The window over global image positions: image query p keeps image key p' where their
    tiles of ``tile`` tokens are at most ``radius`` apart (tile 1: the token band |p - p'| <= radius)."""

    tile: int
    radius: int

    @classmethod
    def of(cls, image_tokens: int, window_decimal: str, text: bool) -> Band:
        """The single-process window's band: the token band over an image-only sequence, the
        arrow's tiles (:mod:`fastattn.kernels.arrow`) where the sequence holds text."""
        half_width = window_half_width(image_tokens, window_decimal)
        if not text:
            return cls(1, half_width)
        return cls(arrow_tile(image_tokens), tile_radius_of(half_width, image_tokens))

    def key_range(self, first: int, last: int) -> tuple[int, int]:
        """The positions queries ``first``..``last`` can keep."""
        return (first // self.tile - self.radius) * self.tile, (last // self.tile + self.radius + 1) * self.tile - 1

    def geometry(self, text_keys: int, query_start: int, key_start: int) -> tuple:
        return ("band", text_keys, query_start, key_start, self.tile, self.radius)


@dataclass(frozen=True)
class VideoTiles:
    """The 3-D tile neighbourhood over a (frames, rows, cols) token grid, as the single-process
    window of a full-3-D video layer keeps it (:mod:`fastattn.kernels.video_masks`)."""

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    radius: int = 1

    @classmethod
    def of(cls, grid, window_size: float) -> VideoTiles:
        grid = tuple(int(n) for n in grid)
        return cls(grid, tile_shape(grid, window_size))

    def key_range(self, first: int, last: int) -> tuple[int, int]:
        return tile_key_range(self.grid, self.tile, self.radius, first, last)

    def geometry(self, text_keys: int, query_start: int, key_start: int) -> tuple:
        return ("tiles", query_start, key_start, self.grid, self.tile, self.radius)


def band_sources(rank: int, world: int, shard: int, window) -> list[int]:
    """The ranks whose image shard (``shard`` tokens each, rank by rank) holds a key ``window``
    (a :class:`Band` or :class:`VideoTiles`) keeps for one of rank ``rank``'s image queries: the
    ring steps the window needs."""
    low, high = window.key_range(rank * shard, (rank + 1) * shard - 1)
    return [j for j in range(world) if j * shard <= high and (j + 1) * shard - 1 >= low]


def _all_gather(t: torch.Tensor, ring: Group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(ring.world)]
    dist.all_gather(parts, t.contiguous(), group=ring.group)
    return parts


def _swap(t: torch.Tensor, peers: list[int], ring: Group) -> list[torch.Tensor]:
    """Each of ``peers``' ``t`` (this rank's own among them), in their order: sent to and received
    from each peer directly (the band is symmetric: a peer whose shard this rank needs needs this one)."""
    t = t.contiguous()
    received, ops = {ring.rank: t}, []
    for peer in peers:
        if peer != ring.rank:
            received[peer] = torch.empty_like(t)
            other = dist.get_global_rank(ring.group, peer)
            ops += [dist.P2POp(dist.isend, t, other, ring.group), dist.P2POp(dist.irecv, received[peer], other, ring.group)]
    for work in dist.batch_isend_irecv(ops) if ops else ():
        work.wait()
    return [received[peer] for peer in peers]


class _Shard:
    """A call's local tokens: which are the image's (one run, ``spans``) and which the text's."""

    def __init__(self, core: Core, spans, layer: int):
        if core.mask is not None or core.causal or core.q.shape != core.k.shape:
            raise ValueError(f"layer {layer}: a masked, causal or cross attention call under ring context "
                             "parallelism; the ring window serves unmasked self or joint attention")
        if spans is not None and (spans[0] != spans[1] or not isinstance(spans[0], tuple)):
            raise ValueError(f"layer {layer}: its queries and keys hold text differently; the ring window needs "
                             "them alike")
        length = core.q.shape[-2]
        start, self.count = spans[0] if spans is not None else (0, length)
        device = core.q.device  # index ranges, not masks: no host sync
        self.image = torch.arange(start, start + self.count, device=device)
        self.text = torch.cat([torch.arange(start, device=device), torch.arange(start + self.count, length, device=device)])

    def rows(self, t: torch.Tensor, image: bool) -> torch.Tensor:
        return t.index_select(-2, self.image if image else self.text)

    def join(self, image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        out = image_rows.new_empty(*image_rows.shape[:-2], self.image.numel() + self.text.numel(), image_rows.shape[-1])
        out.index_copy_(-2, self.image, image_rows)
        return out.index_copy_(-2, self.text, text_rows) if self.text.numel() else out


def _attend_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp [batch, heads, queries] (scores in float32 at least)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.to(dtype)), lse


def _text_rows(core: Core, shard: _Shard, ring: Group) -> torch.Tensor:
    """The rank's text queries over every key of every rank: each rank attends all the text
    queries to its own keys, and the parts are merged by their log-sum-exps."""
    queries = torch.cat(_all_gather(shard.rows(core.q, image=False), ring), dim=-2)
    out, lse = _attend_with_lse(queries, core.k, core.v)
    # each rank's part of every rank's rows goes to that rank (one all-to-all), out and lse together
    parts = torch.cat([out, lse[..., None]], dim=-1).chunk(ring.world, dim=-2)
    received = [torch.empty_like(p) for p in parts]
    dist.all_to_all(received, [p.contiguous() for p in parts], group=ring.group)
    received = torch.stack(received)
    weights = torch.softmax(received[..., -1:], dim=0)  # each rank's share of the softmax mass
    return (weights * received[..., :-1]).sum(dim=0).to(core.v.dtype)


def _image_window(core: Core, shard: _Shard, ring: Group, sources: list[int], keys: list[torch.Tensor],
                  values: list[torch.Tensor], text_k: torch.Tensor, text_v: torch.Tensor,
                  window) -> torch.Tensor:
    """The rank's image queries over the text keys and the image keys of ``sources`` (consecutive
    ranks), in the window by global image position."""
    k, v = torch.cat([text_k, *keys], dim=-2), torch.cat([text_v, *values], dim=-2)
    geometry = window.geometry(text_k.shape[-2], ring.rank * shard.count, sources[0] * shard.count)
    return shard_window_attention(shard.rows(core.q, image=True), k, v, geometry)


def _window(shard: _Shard, ring: Group, window_decimal: str, grid, layer: int):
    """The single-process window on the whole image sequence: the band, or with a ``grid`` the
    video tile neighbourhood (image-only sequences)."""
    if grid is None:
        return Band.of(shard.count * ring.world, window_decimal, text=bool(shard.text.numel()))
    if shard.text.numel():
        raise ValueError(f"layer {layer}: the tile window needs an image-only sequence; this one holds text")
    return VideoTiles.of(check_grid(grid, shard.count * ring.world), float(window_decimal))


def _text_first(fn):
    """``fn`` on a call whose text and image tokens are not each one run (a Ulysses gather of
    shards): run on the tokens reordered text first, its outputs put back in the call's order."""

    @functools.wraps(fn)
    def run(core: Core, spans, *args, **kwargs):
        if not isinstance(spans, Reordered):
            return fn(core, spans, *args, **kwargs)
        out = fn(spans.reorder(core), spans.spans, *args, **kwargs)
        return tuple(map(spans.restore, out)) if isinstance(out, tuple) else spans.restore(out)

    return run


@_text_first
def ring_window(core: Core, spans, window_decimal: str, ring: Group, layer: int, grid=None) -> torch.Tensor:
    """W on the rank's tokens: image keys from the band's ranks only (:func:`band_sources`), the
    text's K/V from every rank, the text queries' rows merged from every rank's part. ``grid``: the
    token grid of a video layer whose window is the tile neighbourhood."""
    shard = _Shard(core, spans, layer)
    window = _window(shard, ring, window_decimal, grid, layer)
    sources = band_sources(ring.rank, ring.world, shard.count, window)
    pairs = _swap(torch.stack([shard.rows(core.k, image=True), shard.rows(core.v, image=True)]), sources, ring)
    keys, values = [p[0] for p in pairs], [p[1] for p in pairs]
    if not shard.text.numel():
        empty = core.k[..., :0, :]
        return _image_window(core, shard, ring, sources, keys, values, empty, empty, window)
    text_kv = torch.cat(_all_gather(torch.stack([shard.rows(core.k, image=False), shard.rows(core.v, image=False)]),
                                    ring), dim=-2)
    image = _image_window(core, shard, ring, sources, keys, values, text_kv[0], text_kv[1], window)
    return shard.join(image, _text_rows(core, shard, ring))


@_text_first
def ring_refresh(core: Core, spans, window_decimal: str, ring: Group, layer: int,
                 grid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The WA-RS refresh on the rank's tokens: O over every rank's keys (one gather of every
    shard) and R = O - W, W's image rows from the same keys in the band (its text rows are O's)."""
    shard = _Shard(core, spans, layer)
    window = _window(shard, ring, window_decimal, grid, layer)
    gathered = _all_gather(torch.stack([core.k, core.v]), ring)
    every = torch.cat(gathered, dim=-2)
    o = F.scaled_dot_product_attention(core.q, every[0], every[1])
    text_kv = torch.cat([shard.rows(kv, image=False) for kv in gathered], dim=-2)
    images = [shard.rows(kv, image=True) for kv in gathered]
    image = _image_window(core, shard, ring, list(range(ring.world)), [kv[0] for kv in images],
                          [kv[1] for kv in images], text_kv[0], text_kv[1], window)
    w = shard.join(image, shard.rows(o, image=False))
    return o, o - w


def ring_full(core: Core, ring: Group) -> torch.Tensor:
    """Full attention of the rank's queries over every rank's keys."""
    if core.causal or core.mask is not None:
        raise ValueError("a masked or causal attention call under ring context parallelism: the ring window "
                         "serves unmasked self or joint attention")
    every = torch.cat(_all_gather(torch.stack([core.k, core.v]), ring), dim=-2)
    return F.scaled_dot_product_attention(core.q, every[0], every[1])


__all__ = ["Band", "VideoTiles", "band_sources", "local_attention", "ring_full", "ring_refresh", "ring_window"]
