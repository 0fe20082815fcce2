"""Head-wise arrow attention over a joint (image + text) sequence (DiTFastAttnV2 section 3).

Every row and column that involves a text token is attended in full; the image-image block
keeps only keys within a per-head half-width of the query (a 1-D band over the image tokens).
A head whose half-width reaches every image token is plain full attention; a half-width of
-1 (:data:`SKIP`) attends nothing and outputs zeros, for heads whose output comes from a cache.

A layer with arrow heads runs as one call on CUDA: FlexAttention with a head-indexed block
mask (empty tiles are skipped, so a narrow window is cheaper and a skipped head costs nothing;
the head count stays the model's, so one compiled kernel serves every mix and no q/k/v are
gathered). A layer of only full and skipped heads runs dense SDPA over the gathered computing
heads (exact, and the fastest dense kernel). On the CPU a grouped fallback runs only the
computing heads: full heads through plain SDPA (bit-identical to the model's attention), each
window size through masked SDPA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .masks import band_pairs, dense_mask

SKIP = -1  # half-width of a head that is not computed (its output is taken from a cache)


@functools.lru_cache(maxsize=None)
def _check_span(image_start: int, image_len: int, seq_len: int) -> None:
    if image_len < 1 or image_start < 0 or image_start + image_len > seq_len:
        raise ValueError(f"image span [{image_start}, {image_start + image_len}) does not fit a sequence "
                         f"of {seq_len} tokens")


def arrow_mask_mod(image_start: int, image_len: int, half_widths):
    """mask_mod(b, h, q_idx, kv_idx): text rows/columns in full, image-image within half_widths[h].

    ``half_widths`` is an int (every head) or a 1-D long tensor indexed by head.
    """
    image_end = image_start + image_len

    def keep(b, h, q_idx, kv_idx):
        w = half_widths[h] if isinstance(half_widths, torch.Tensor) else half_widths
        q_text = (q_idx < image_start) | (q_idx >= image_end)
        k_text = (kv_idx < image_start) | (kv_idx >= image_end)
        return (w >= 0) & (q_text | k_text | ((q_idx - kv_idx).abs() <= w))

    return keep


def arrow_pairs(image_len: int, text_len: int, half_width: int) -> int:
    """(query, key) pairs an arrow head attends: everything but the image pairs outside the band."""
    seq = image_len + text_len
    return seq * seq - image_len * image_len + band_pairs(image_len, half_width)


def _dense(q, k, v):
    # The call diffusers' joint processors make, so full heads reproduce the model exactly.
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


@functools.lru_cache(maxsize=64)
def _bool_mask(seq_len: int, image_start: int, image_len: int, half_width: int, device: torch.device):
    return dense_mask(arrow_mask_mod(image_start, image_len, half_width), seq_len, seq_len, device=device)


def _flex_available(q: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def arrow_block_mask(seq_len: int, image_start: int, image_len: int, half_widths: tuple[int, ...], device=None,
                     block: int = 128, mask_mod=None):
    """FlexAttention ``BlockMask`` of the arrow, computed per tile from the tile's index ranges.

    ``create_block_mask`` would evaluate the mask at every (head, query, key): billions of
    entries at FLUX 2048^2. A tile's status follows from its ranges instead: it is non-empty if it
    holds a text row or column or its image parts come within the half-width, and full if its
    image-image pairs all lie within it (or it has none). ``mask_mod`` (default: the arrow of
    ``half_widths``) decides the elements of partial tiles.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-seq_len // block)
    start = torch.arange(n, device=device) * block
    stop = torch.clamp(start + block, max=seq_len) - 1  # last index in the tile
    lo, hi = image_start, image_start + image_len - 1
    img0, img1 = torch.clamp(start, min=lo), torch.clamp(stop, max=hi)  # the tile's image sub-range
    has_img = img0 <= img1
    has_text = (start < lo) | (stop > hi)
    q0, q1, qi, qt = img0[:, None], img1[:, None], has_img[:, None], has_text[:, None]
    k0, k1, ki, kt = img0[None, :], img1[None, :], has_img[None, :], has_text[None, :]
    nearest = torch.clamp(torch.maximum(k0 - q1, q0 - k1), min=0)
    farthest = torch.maximum(q1 - k0, k1 - q0)
    w = torch.tensor(half_widths, device=device)[:, None, None]
    live = w >= 0
    nonempty = live & (qt | kt | (qi & ki & (nearest <= w)))
    whole = (stop - start + 1) == block  # a tile cut by the sequence end is never "full" (as create_block_mask)
    full = live & whole[:, None] & whole[None, :] & (~qi | ~ki | (farthest <= w))
    partial = nonempty & ~full

    def as_kv_blocks(m):
        m = m[None]  # batch dimension (broadcast over the batch)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).to(torch.int32), order.to(torch.int32)

    kv_num, kv_idx = as_kv_blocks(partial)
    full_num, full_idx = as_kv_blocks(full)
    if mask_mod is None:
        mask_mod = arrow_mask_mod(image_start, image_len, torch.tensor(half_widths, dtype=torch.long, device=device))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


# One mask_mod per (span, heads) reading the half-widths from one buffer that is filled before
# each call: every block mask of a model then shares a mask_mod, so the compiled kernel is
# reused across plans instead of being recompiled for each mix of windows.
@functools.lru_cache(maxsize=None)
def _widths_buffer(device: torch.device, heads: int) -> torch.Tensor:
    return torch.zeros(heads, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=1024)
def device_constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor (head indices, head flags) made once per device: building it per
    call would copy from host memory and make the host wait for the GPU every layer."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=64)
def _shared_mask_mod(image_start: int, image_len: int, device: torch.device, heads: int):
    return arrow_mask_mod(image_start, image_len, _widths_buffer(device, heads))


@functools.lru_cache(maxsize=256)
def _block_mask(seq_len: int, image_start: int, image_len: int, half_widths: tuple[int, ...], device: torch.device):
    mod = _shared_mask_mod(image_start, image_len, device, len(half_widths))
    return arrow_block_mask(seq_len, image_start, image_len, half_widths, device, mask_mod=mod)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _grouped(q, k, v, widths, image_start, image_len) -> torch.Tensor:
    """One SDPA call per distinct half-width over the heads that have it; skipped heads stay zero."""
    out = torch.zeros_like(q) if SKIP in widths else torch.empty_like(q)
    seq = q.shape[-2]
    for w in sorted(set(widths) - {SKIP}):
        idx = [i for i, x in enumerate(widths) if x == w]
        if len(idx) == len(widths):
            qs, ks, vs, sel = q, k, v, None
        else:
            sel = device_constant(tuple(idx), q.device)
            qs, ks, vs = (t.index_select(1, sel) for t in (q, k, v))
        if w >= image_len - 1:
            o = _dense(qs, ks, vs)
        else:
            mask = _bool_mask(seq, image_start, image_len, w, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if sel is None:
            return o
        out.index_copy_(1, sel, o)
    return out


def arrow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, half_widths, image_start: int,
                    image_len: int) -> torch.Tensor:
    """Arrow attention for [batch, heads, seq, head_dim] inputs, one half-width per head.

    A half-width >= image_len - 1 makes that head full attention; :data:`SKIP` leaves it zero.
    """
    heads, seq = q.shape[1], q.shape[-2]
    widths = [int(w) for w in half_widths]
    if len(widths) != heads:
        raise ValueError(f"arrow_attention: {len(widths)} half-widths for {heads} heads")
    if any(w < SKIP for w in widths):
        raise ValueError(f"arrow_attention: half-widths must be >= 0 (or {SKIP} to skip a head), got {widths}")
    _check_span(image_start, image_len, seq)
    widths = [min(w, image_len - 1) for w in widths]
    if all(w == SKIP for w in widths):
        return torch.zeros_like(q)
    if all(w >= image_len - 1 for w in widths):
        return _dense(q, k, v)
    windowed = any(SKIP < w < image_len - 1 for w in widths)
    if windowed and _flex_available(q):
        block_mask = _block_mask(seq, image_start, image_len, tuple(widths), q.device)
        _widths_buffer(q.device, heads).copy_(device_constant(tuple(widths), q.device))  # stream-ordered
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    # Only full and skipped heads (or no GPU): dense SDPA over the computing heads is exact and fastest.
    return _grouped(q, k, v, widths, image_start, image_len)
