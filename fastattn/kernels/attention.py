"""Attention entry points used by the processor: dense, windowed, and the WA-RS refresh.

All take and return [batch, heads, seq, head_dim]. Backends, picked per call by the one
dispatcher (:func:`.dispatch.choose`) and named for a block with
:func:`.dispatch.attention_backend` (or for the process with :func:`set_window_backend`):

* ``fa4``: FlashAttention-4 (:mod:`.fa4`): the band as its native local window, the refresh as
  band + off-band keys merged by log-sum-exp (the CUDA default on SM90/SM100 when the package
  imports and :func:`.fa4.set_fa4` allows it; fastest on an H200, see BENCHMARKS.md);
* ``flex``: FlexAttention with a cached block mask, compiled once per shape (the CUDA default
  elsewhere);
* ``triton``: the band kernels of :mod:`.triton_band`, including the one-pass refresh;
* ``sdpa``: SDPA with a boolean mask: exact but dense work (the CPU path).

The 2-D ``tile`` window runs block-sparse through FA4 (SM90) or FlexAttention on CUDA and masked
SDPA elsewhere (a named ``fa4``, ``flex`` or ``sdpa`` backend is honoured; ``triton`` has no tile kernel). Dense attention is :func:`.dense.dense_attention` (FA4 where enabled, else SDPA);
:func:`prefer_fast_dense` sends the model's own SDPA calls to the same kernel (or cuDNN first),
for the raw model and the compressed one alike.

Under ``torch.compile`` the windowed entry points (band, tile, refresh) are each one custom op
(``fastattn::window_attention``, ``::tile_attention``, ``::refresh_attention``, see
:mod:`.opaque`): the backend choice, the cached masks and the kernels run inside it, so a
compiled layer has no graph break; dense attention stays in the graph (SDPA, or FA4's own op).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import fa4
from .dense import dense_attention
from .dispatch import WINDOW_BACKENDS, choose, configure, current
from .flex import flex_attention_call, flex_available
from .opaque import opaque_kernel
from .arrow import arrow_keep
from .masks import band_mask_mod, dense_mask, shard_band_mask_mod, tile_mask_mod
from .video_masks import shard_tile_mask_mod
from .triton_band import triton_refresh, triton_window

__all__ = ["WINDOW_BACKENDS", "get_window_backend", "masked_window_attention", "refresh_attention",
           "set_window_backend", "shard_window_attention", "tile_attention", "window_attention"]


def set_window_backend(name: str) -> None:
    """The dispatcher's window backend for the process (``auto`` or a backend name)."""
    configure(name)


def get_window_backend() -> str:
    return current().backend


@functools.lru_cache(maxsize=32)
def _bool_mask(kind: str, seq_len: int, size: int, grid_width: int, device: torch.device) -> torch.Tensor:
    return dense_mask(_mask_mod(kind, size, grid_width), seq_len, seq_len, device=device)


def _mask_mod(kind: str, size: int, grid_width: int):
    return band_mask_mod(size) if kind == "band" else tile_mask_mod(size, grid_width)


@functools.lru_cache(maxsize=32)
def _block_mask(kind: str, seq_len: int, size: int, grid_width: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_mask_mod(kind, size, grid_width), None, None, seq_len, seq_len, device=device)


def _masked(q, k, v, kind: str, size: int, grid_width: int, backend: str) -> torch.Tensor:
    seq_len = q.shape[-2]
    if backend == "flex":
        mask = _block_mask(kind, seq_len, size, grid_width, q.device)
        return flex_attention_call(q, k, v, mask)
    mask = _bool_mask(kind, seq_len, size, grid_width, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def window_attention(q, k, v, half_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Attention restricted to keys with |q_idx - k_idx| <= half_width, plus ``residual`` if given."""
    seq_len = q.shape[-2]
    if half_width >= seq_len - 1:
        out = dense_attention(q, k, v)
    elif torch.compiler.is_compiling():
        return torch.ops.fastattn.window_attention(q, k, v, half_width, residual)
    else:
        backend = choose(q, "window")
        if backend == "triton":
            return triton_window(q, k, v, half_width, residual)
        if backend == "fa4":
            out = fa4.window(q, k, v, half_width)
            return out if residual is None else out.add_(residual)  # a fresh buffer: add in place
        out = _masked(q, k, v, "band", half_width, 0, backend)
    return out if residual is None else out + residual


def tile_attention(q, k, v, radius: int, grid_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Attention restricted to a (2r+1)^2 square of the latent grid around each query token."""
    if torch.compiler.is_compiling():
        return torch.ops.fastattn.tile_attention(q, k, v, radius, grid_width, residual)
    backend = choose(q, "tile")
    if backend == "fa4":
        # FlexAttention's block mask, its partial blocks masked per element by FA4
        mask = _block_mask("tile", q.shape[-2], radius, grid_width, q.device)
        out = fa4.sparse(q, k, v, fa4.blocks_from_block_mask(mask), fa4.Mask("tile2d", (radius, grid_width)))
        return out if residual is None else out.add_(residual)
    out = _masked(q, k, v, "tile", radius, grid_width, backend)
    return out if residual is None else out + residual


def refresh_attention(q, k, v, half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The WA-RS refresh step: full attention O and the residual R = O - W.

    With ``fa4``, from the band and the off-band keys merged by log-sum-exp
    (:func:`.fa4.refresh`); with ``triton`` both come from one pass over the keys; otherwise from
    the best dense kernel plus the window kernel (see BENCHMARKS.md).
    """
    if half_width < q.shape[-2] - 1:
        if torch.compiler.is_compiling():
            o, r = torch.ops.fastattn.refresh_attention(q, k, v, half_width)
            return o, r
        backend = choose(q, "refresh")
        if backend == "fa4":
            return fa4.refresh(q, k, v, half_width)
        if backend == "triton":
            return triton_refresh(q, k, v, half_width)
    o = dense_attention(q, k, v)
    return o, o - window_attention(q, k, v, half_width)


# One graph node each under torch.compile: the eager entry points above, with outputs laid out as q.
opaque_kernel("window_attention", window_attention, "(Tensor q, Tensor k, Tensor v, int half_width, Tensor? residual) -> Tensor")
opaque_kernel("tile_attention", tile_attention,
              "(Tensor q, Tensor k, Tensor v, int radius, int grid_width, Tensor? residual) -> Tensor")
opaque_kernel("refresh_attention", refresh_attention, "(Tensor q, Tensor k, Tensor v, int half_width) -> (Tensor, Tensor)")


def masked_window_attention(q, k, v, half_width: int, mask: torch.Tensor | None,
                            image_span: tuple[int, int] | None = None,
                            key_span: tuple[int, int] | None = None, causal: bool = False) -> torch.Tensor:
    """The window under the call's own attention ``mask`` (a padding mask: boolean or additive,
    broadcastable to [batch, heads, q tokens, k tokens]), or over an ``image_span`` (first token,
    tokens) of a sequence that also holds text: with a span, the band runs over the image tokens
    (in the arrow's tiles, :mod:`.arrow`) and every pair involving text is kept; ``key_span``
    places the image among the keys where they differ from the queries (text in the keys only).
    ``causal``: the call's own causality kept too. One masked SDPA call over the pairs all keep:
    exact, not sparse."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    if image_span is None and q_len == k_len:
        keep = _bool_mask("band", q_len, half_width, 0, q.device)
    else:
        image_span = image_span or (0, q_len)
        keep = arrow_keep(q_len, k_len, image_span, key_span or image_span, half_width, q.device)
    if causal:  # SDPA's is_causal: a query sees the keys up to its own index
        keep = keep & torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril()
    if mask is not None:  # broadcast against the call's mask ([batch, 1, 1, keys] for key padding)
        keep = keep & mask if mask.dtype == torch.bool else torch.where(keep, mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.0, is_causal=False)


def _shard_mask_mod(geometry: tuple):
    kind, *args = geometry
    return shard_band_mask_mod(*args) if kind == "band" else shard_tile_mask_mod(*args)


@functools.lru_cache(maxsize=32)
def _shard_mask(flex: bool, q_len: int, kv_len: int, geometry: tuple, device):
    mask_mod = _shard_mask_mod(geometry)
    if not flex:
        return dense_mask(mask_mod, q_len, kv_len, device=device)
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def shard_window_attention(q, k, v, geometry: tuple) -> torch.Tensor:
    """One shard's image queries over a run of keys (text keys, then image keys) in the window of
    the whole image sequence: ``geometry`` is ``("band", text_keys, query_start, key_start, tile,
    radius)`` (:func:`.masks.shard_band_mask_mod`) or ``("tiles", query_start, key_start, grid,
    tile, radius)`` (:func:`.video_masks.shard_tile_mask_mod`), the starts placing the queries and
    the first image key in the whole sequence. Block-sparse through FlexAttention on CUDA, masked
    SDPA elsewhere; the mask is cached per geometry."""
    flex = flex_available(q)
    mask = _shard_mask(flex, q.shape[-2], k.shape[-2], geometry, q.device)
    if flex:
        return flex_attention_call(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
