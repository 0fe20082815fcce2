"""Head-wise arrow attention over a joint (image + text) sequence (DiTFastAttnV2 section 3).

Every row and column that involves a text token is attended in full; the image-image block
keeps a band around the diagonal whose width is chosen per head. The band is made of whole
tiles of :func:`arrow_tile` image tokens (128, the kernel's block, at real resolutions): a
query keeps the keys within ``r`` tiles of its own tile. So every image-image block the kernel
visits is entirely inside the band (the V2 paper's kernel likewise runs mixed blocks dense)
and no block evaluates the mask element by element. A window given as a token half-width w
(:meth:`HeadMethod.half_width`) becomes the radius whose (2r+1) tiles hold about the band's
2w+1 keys per query (:func:`tile_radius_of`). A head whose band reaches every image token is
plain full attention; a half-width of -1 (:data:`SKIP`) attends nothing and outputs zeros, for
heads whose output comes from a cache.

On an SM90 GPU with FlashAttention-4 (:mod:`.fa4`) and block-aligned tiles (FLUX, SD3 at their
resolutions) a layer with windowed heads is one block-sparse FA4 call over all heads: every
visited block is whole, so no element is masked; full heads run inside it and skipped heads
visit no block. Otherwise, on CUDA, a layer with windowed heads runs them as one FlexAttention
call over all heads with a head-indexed block mask (other heads get an empty mask and cost
nothing; the head count stays the model's, so one compiled kernel serves every mix); at large
sizes its full heads run as one dense call (cuDNN or FA4, faster per block than Flex) over the
gathered full heads. A layer of only full and skipped heads runs dense attention over the
computing heads. Skipped heads can keep the values of an ``out`` buffer, so a layer's cache is
updated in place. On the CPU a grouped fallback runs only the computing heads: full heads
through plain SDPA (bit-identical to the model's attention), each band through masked SDPA.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import fa4
from .dense import dense_attention
from .dispatch import choose
from .flex import flex_attention_call
from .masks import dense_mask
from .opaque import opaque_kernel

SKIP = -1  # half-width (and tile radius) of a head that is not computed (its output comes from a cache)
ARROW_TILE = 128  # image tokens per band tile at real resolutions: FlexAttention's block


@functools.lru_cache(maxsize=None)
def _check_span(image_start: int, image_len: int, seq_len: int) -> None:
    if image_len < 1 or image_start < 0 or image_start + image_len > seq_len:
        raise ValueError(f"image span [{image_start}, {image_start + image_len}) does not fit a sequence "
                         f"of {seq_len} tokens")


@functools.lru_cache(maxsize=None)
def arrow_tile(image_len: int) -> int:
    """Tokens per band tile: :data:`ARROW_TILE`, or for small images the largest power of two
    that is at most 1/32 of them (so the narrowest default window, 1/32, is still one tile and
    tiny test models keep a real band; 1 makes the band the token band |q - k| <= w)."""
    tile = 1
    while tile * 2 <= min(ARROW_TILE, image_len // 32):
        tile *= 2
    return tile


def _tiles(image_len: int, tile: int) -> int:
    return -(-image_len // tile)


def tile_radius_of(half_width: int, image_len: int) -> int:
    """Band radius in tiles for a token half-width: (2r+1) tiles hold about 2w+1 keys per query.
    :data:`SKIP` stays skipped; a band reaching every image token is the full radius (tiles - 1)."""
    if half_width == SKIP:
        return SKIP
    tile = arrow_tile(image_len)
    full = _tiles(image_len, tile) - 1
    if half_width >= image_len - 1:
        return full
    return min(full, max(0, math.floor(((2 * half_width + 1) / tile - 1) / 2 + 0.5)))


def arrow_mask_mod(image_start: int, image_len: int, radii, tile: int = 1):
    """mask_mod(b, h, q_idx, kv_idx): text rows/columns in full, image-image pairs whose tiles
    (of ``tile`` tokens from the image start) are at most ``radii[h]`` tiles apart.

    ``radii`` is an int (every head) or a 1-D long tensor indexed by head; with ``tile=1`` it is
    the token band |q - k| <= radius.
    """
    image_end = image_start + image_len

    def keep(b, h, q_idx, kv_idx):
        r = radii[h] if isinstance(radii, torch.Tensor) else radii
        q_text = (q_idx < image_start) | (q_idx >= image_end)
        k_text = (kv_idx < image_start) | (kv_idx >= image_end)
        apart = ((q_idx - image_start) // tile - (kv_idx - image_start) // tile).abs()
        return (r >= 0) & (q_text | k_text | (apart <= r))

    return keep


def band_tile_pairs(image_len: int, tile: int, radius: int) -> int:
    """Image-image (query, key) pairs whose tiles are at most ``radius`` apart."""
    n = _tiles(image_len, tile)
    sizes = [tile] * (n - 1) + [image_len - tile * (n - 1)]
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    return sum(s * (prefix[min(n, i + radius + 1)] - prefix[max(0, i - radius)]) for i, s in enumerate(sizes))


@functools.lru_cache(maxsize=4096)  # plan FLOPs accounting asks for every head of every layer and step
def arrow_pairs(image_len: int, text_len: int, half_width: int) -> int:
    """(query, key) pairs an arrow head attends: everything but the image pairs outside its band."""
    seq = image_len + text_len
    radius = tile_radius_of(half_width, image_len)
    if radius == SKIP:
        return 0
    return seq * seq - image_len * image_len + band_tile_pairs(image_len, arrow_tile(image_len), radius)


@functools.lru_cache(maxsize=64)
def _bool_mask(seq_len: int, image_start: int, image_len: int, radius: int, tile: int, device: torch.device):
    return dense_mask(arrow_mask_mod(image_start, image_len, radius, tile), seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=64)
def arrow_keep(q_len: int, k_len: int, q_span: tuple[int, int], k_span: tuple[int, int], half_width: int,
               device) -> torch.Tensor:
    """The boolean [q_len, k_len] arrow of one token half-width, in :func:`arrow_attention`'s
    tiles: every pair with a text token kept, image query and key tokens (the ``(start, count)``
    spans, the same count) kept where their tiles are at most the radius apart. With q and k the
    same sequence it is :func:`arrow_mask_mod`'s; keys may hold text the queries do not
    (NucleusMoE, PRX: the text appended to the keys only)."""
    count = q_span[1]
    tile, radius = arrow_tile(count), tile_radius_of(half_width, count)
    qi = torch.arange(q_len, device=device)[:, None] - q_span[0]
    kj = torch.arange(k_len, device=device)[None, :] - k_span[0]
    text = (qi < 0) | (qi >= count) | (kj < 0) | (kj >= k_span[1])
    return text | ((torch.div(qi, tile, rounding_mode="floor") - torch.div(kj, tile, rounding_mode="floor")).abs()
                   <= radius)


def arrow_blocks(seq_len: int, image_start: int, image_len: int, radii: tuple[int, ...], tile: int = 1,
                 device=None, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(non-empty, full) boolean [heads, q_blocks, k_blocks] block matrices of the arrow, from
    the blocks' index ranges.

    ``create_block_mask`` would evaluate the mask at every (head, query, key): billions of
    entries at FLUX 2048^2. A block's status follows from its ranges instead: it is non-empty if
    it holds a text row or column or its image parts come within the radius, and full if all its
    image-image pairs do (or it has none). A block cut by the sequence end is never full (as
    ``create_block_mask`` has it)."""
    n = -(-seq_len // block)
    start = torch.arange(n, device=device) * block
    stop = torch.clamp(start + block, max=seq_len) - 1  # last index in the block
    lo, hi = image_start, image_start + image_len - 1
    img0, img1 = torch.clamp(start, min=lo), torch.clamp(stop, max=hi)  # the block's image sub-range
    has_img = img0 <= img1
    has_text = (start < lo) | (stop > hi)
    t0, t1 = torch.div(img0 - lo, tile, rounding_mode="floor"), torch.div(img1 - lo, tile, rounding_mode="floor")
    q0, q1, qi, qt = t0[:, None], t1[:, None], has_img[:, None], has_text[:, None]
    k0, k1, ki, kt = t0[None, :], t1[None, :], has_img[None, :], has_text[None, :]
    nearest = torch.clamp(torch.maximum(k0 - q1, q0 - k1), min=0)  # in tiles
    farthest = torch.maximum(q1 - k0, k1 - q0)
    r = torch.tensor(radii, device=device)[:, None, None]
    live = r >= 0
    nonempty = live & (qt | kt | (qi & ki & (nearest <= r)))
    whole = (stop - start + 1) == block
    full = live & whole[:, None] & whole[None, :] & (~qi | ~ki | (farthest <= r))
    return nonempty, full


def arrow_block_mask(seq_len: int, image_start: int, image_len: int, radii: tuple[int, ...], tile: int = 1,
                     device=None, block: int = 128, mask_mod=None):
    """FlexAttention ``BlockMask`` of the arrow (:func:`arrow_blocks`). ``mask_mod`` (default:
    the arrow of ``radii``) decides the elements of partial blocks; with tiles that line up with
    the blocks there are none but the block cut by the sequence end."""
    from torch.nn.attention.flex_attention import BlockMask

    nonempty, full = arrow_blocks(seq_len, image_start, image_len, radii, tile, device, block)
    partial = nonempty & ~full

    def as_kv_blocks(m):
        m = m[None]  # batch dimension (broadcast over the batch)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).to(torch.int32), order.to(torch.int32)

    kv_num, kv_idx = as_kv_blocks(partial)
    full_num, full_idx = as_kv_blocks(full)
    if mask_mod is None:
        mask_mod = arrow_mask_mod(image_start, image_len, torch.tensor(radii, dtype=torch.long, device=device), tile)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


def fa4_aligned(seq_len: int, image_start: int, image_len: int, tile: int) -> bool:
    """Whether every non-empty block of the arrow is whole (inside the band or a text row or
    column) or cut only by the sequence end: tiles of whole blocks and an image span starting and
    ending on block boundaries (or at the sequence end). FA4 then needs no per-element mask."""
    end, block = image_start + image_len, ARROW_TILE
    return tile % block == 0 and image_start % block == 0 and (end % block == 0 or end == seq_len)


@functools.lru_cache(maxsize=256)
def _fa4_blocks(seq_len: int, image_start: int, image_len: int, radii: tuple[int, ...], tile: int,
                device: torch.device) -> fa4.Blocks:
    nonempty, _ = arrow_blocks(seq_len, image_start, image_len, radii, tile, device, ARROW_TILE)
    return fa4.blocks_from_matrices(nonempty, torch.zeros_like(nonempty), (ARROW_TILE, ARROW_TILE))


# One mask_mod per (span, tile, heads) reading the radii from one buffer that is filled before
# each call: every block mask of a model then shares a mask_mod, so the compiled kernel is
# reused across plans instead of being recompiled for each mix of windows.
@functools.lru_cache(maxsize=None)
def _radii_buffer(device: torch.device, heads: int) -> torch.Tensor:
    return torch.zeros(heads, dtype=torch.long, device=device)


def device_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor (head indices, head flags) made once per device: building it per
    call would copy from host memory and make the host wait for the GPU every layer. (Under
    torch.compile: a constant of the graph.)"""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    return _device_constant(values, device)


@functools.lru_cache(maxsize=1024)
def _device_constant(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=64)
def _shared_mask_mod(image_start: int, image_len: int, tile: int, device: torch.device, heads: int):
    return arrow_mask_mod(image_start, image_len, _radii_buffer(device, heads), tile)


@functools.lru_cache(maxsize=256)
def _block_mask(seq_len: int, image_start: int, image_len: int, radii: tuple[int, ...], tile: int,
                device: torch.device):
    mod = _shared_mask_mod(image_start, image_len, tile, device, len(radii))
    return arrow_block_mask(seq_len, image_start, image_len, radii, tile, device, mask_mod=mod)


# Flex tile configuration by head dimension, where it beats the default. Measured on an H100
# (experiments/bench/arrow_probe.py): head dim 64 (SD3, 4,429 tokens) runs arrow layers 26%
# faster with 64-row query tiles; at head dim 128 (FLUX) the default is fastest.
FLEX_OPTIONS_BY_HEAD_DIM = {64: {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}}

# A layer's full heads run through dense SDPA (gathered) next to the Flex call of its windowed
# heads from this many tokens on; below it they run inside the Flex call. On an H100 the split
# saves 18% of a 75%-sparse FLUX layer at 16,896 tokens and costs 15% of an SD3 one at 4,429
# (cuDNN is faster per block than Flex, the gathers cost more than that at small sizes).
SPLIT_FULL_HEADS_FROM_TOKENS = 8192


def _flex_arrow(q, k, v, radii: tuple[int, ...], image_start: int, image_len: int, tile: int) -> torch.Tensor:
    heads, seq = q.shape[1], q.shape[-2]
    block_mask = _block_mask(seq, image_start, image_len, radii, tile, q.device)
    _radii_buffer(q.device, heads).copy_(device_constant(radii, q.device))  # stream-ordered
    options = FLEX_OPTIONS_BY_HEAD_DIM.get(q.shape[-1])
    return flex_attention_call(q, k, v, block_mask, kernel_options=options)


def _grouped(q, k, v, radii, image_start, image_len, out=None) -> torch.Tensor:
    """One SDPA call per distinct radius over the heads that have it; skipped heads keep ``out``'s
    values (zero without it)."""
    tile = arrow_tile(image_len)
    full = _tiles(image_len, tile) - 1
    groups = sorted(set(radii) - {SKIP})
    if out is None and (SKIP in radii or len(groups) > 1):  # else one group of every head: its output is the result
        out = torch.zeros_like(q)
    seq = q.shape[-2]
    for r in groups:
        idx = [i for i, x in enumerate(radii) if x == r]
        whole = len(idx) == len(radii)
        sel = None if whole else device_constant(tuple(idx), q.device)
        qs, ks, vs = (q, k, v) if whole else (t.index_select(1, sel) for t in (q, k, v))
        if r >= full:
            o = dense_attention(qs, ks, vs)
        else:
            mask = _bool_mask(seq, image_start, image_len, r, tile, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if out is None:
            return o
        if whole:
            out.copy_(o)
        else:
            out.index_copy_(1, sel, o)
    return out


def arrow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half_widths, image_start: int,
                    image_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Arrow attention for [batch, heads, seq, head_dim] inputs, one token half-width per head
    (made whole tiles by :func:`tile_radius_of`).

    A half-width >= image_len - 1 makes that head full attention; :data:`SKIP` heads are zero,
    or, given ``out`` (of q's shape and dtype), keep ``out``'s values: the computing heads are
    written into it (a layer's cache updated in place) and it is returned. Under
    ``torch.compile`` (without ``out``) it is the one ``fastattn::arrow_attention`` op.
    """
    if out is None and torch.compiler.is_compiling():
        return torch.ops.fastattn.arrow_attention(q, k, v, [int(w) for w in half_widths], image_start, image_len)
    heads, seq = q.shape[1], q.shape[-2]
    widths = [int(w) for w in half_widths]
    if len(widths) != heads:
        raise ValueError(f"arrow_attention: {len(widths)} half-widths for {heads} heads")
    if any(w < SKIP for w in widths):
        raise ValueError(f"arrow_attention: half-widths must be >= 0 (or {SKIP} to skip a head), got {widths}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"arrow_attention: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    _check_span(image_start, image_len, seq)
    tile = arrow_tile(image_len)
    full = _tiles(image_len, tile) - 1
    radii = tuple(tile_radius_of(w, image_len) for w in widths)
    if all(r == SKIP for r in radii):
        return torch.zeros_like(q) if out is None else out
    if all(r == full for r in radii):
        return dense_attention(q, k, v) if out is None else out.copy_(dense_attention(q, k, v))
    if not any(SKIP < r < full for r in radii) or (backend := choose(q, "arrow")) == "sdpa":
        # Only full and skipped heads (or no GPU): dense SDPA over the computing heads is exact and fastest.
        return _grouped(q, k, v, radii, image_start, image_len, out)
    if backend == "fa4" and fa4_aligned(seq, image_start, image_len, tile):
        # One FA4 call over every head: each head's blocks are whole, full heads included (FA4's
        # block-sparse kernel runs a full row as fast as its dense one); skipped heads visit none.
        o = fa4.sparse(q, k, v, _fa4_blocks(seq, image_start, image_len, radii, tile, q.device))
        return _skipped_kept(o, radii, out)
    full_heads = tuple(h for h, r in enumerate(radii) if r == full)
    split = bool(full_heads) and seq >= SPLIT_FULL_HEADS_FROM_TOKENS
    o = _flex_arrow(q, k, v, tuple(SKIP if split and r == full else r for r in radii), image_start, image_len, tile)
    if split:
        sel = device_constant(full_heads, q.device)
        o.index_copy_(1, sel, dense_attention(*(t.index_select(1, sel) for t in (q, k, v))))
    return _skipped_kept(o, radii, out)


def _skipped_kept(o: torch.Tensor, radii: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    """``o`` (skipped heads zero) or, given ``out``, its computing heads written into ``out``."""
    if out is None:
        return o
    sel = device_constant(tuple(h for h, r in enumerate(radii) if r != SKIP), o.device)
    return out.index_copy_(1, sel, o.index_select(1, sel))


opaque_kernel("arrow_attention", arrow_attention,
              "(Tensor q, Tensor k, Tensor v, int[] half_widths, int image_start, int image_len) -> Tensor")
