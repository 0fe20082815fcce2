"""FlashAttention-4 (the ``flash-attn-4`` package: CuTe-DSL kernels compiled at first call, for
SM90 and SM100) as the kernels' backend on Hopper and Blackwell.

Whether it runs is one process-wide mode of the kernel dispatcher (:mod:`.dispatch`), set with
:func:`set_fa4` (the configs' ``fa4`` key) or ``attention_backend(fa4=...)``:

* ``auto`` (default): on CUDA inputs in fp16/bf16 on an SM90/SM100 GPU when ``flash_attn.cute``
  imports; everything else takes today's routes (cuDNN SDPA, FlexAttention, masked SDPA);
* ``on``: the same, but setting it fails with a one-line error when the package or the GPU is
  missing;
* ``off``: never.

Routes (each kernel entry point asks :func:`.dispatch.choose`, which asks :func:`enabled_for` /
:func:`sparse_enabled_for` through the ``fa4`` backend registered here):
dense attention; the 1-D band as FA4's native ``window_size=(w, w)``; the WA-RS refresh as the
band with its log-sum-exp plus the off-band keys (block-sparse, the band edges masked per
element) with theirs, merged in one pass (:mod:`.merge`): O and R for about one dense pass; and
block-sparse attention from a FlexAttention ``BlockMask`` or block matrices (2-D tile, video
3-D tile, head-wise arrow). Block-sparse routes are used on SM90 only (the GPU they were
measured on). Inputs stay [batch, heads, seq, head_dim]; FA4 reads them as [batch, seq, heads,
head_dim] views (no copy when they come from a head split) and the output comes back as a
[batch, heads, seq, head_dim] view of its [batch, seq, heads, head_dim] buffer, so merging heads
before the output projection is free.

Under ``torch.compile`` each call is the ``fastattn::fa4_attention`` custom op (FA4's own entry
point breaks the graph); eager calls skip the op's dispatch. Nothing here waits for the GPU.
:func:`route_sdpa` sends the unmodified model's own mask-free SDPA calls to FA4, so the raw
baseline runs on the same dense kernel as the compressed model.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from . import flex
from .dispatch import KINDS, Backend, attention_backend, choose, configure, current, register

_HALF = (torch.float16, torch.bfloat16)


# -- availability and the mode ------------------------------------------------------------------

_importable: bool | None = None
_majors: dict = {}  # device -> compute capability major: plain dicts, which torch.compile reads as constants


@torch.compiler.assume_constant_result  # an import attempt: run at trace time, not traced
def fa4_importable() -> bool:
    global _importable
    if _importable is None:
        try:
            from flash_attn.cute.interface import _flash_attn_fwd  # noqa: F401
            _importable = True
        except Exception:  # noqa: BLE001 - missing, or a broken CUDA / CuTe install: not usable either way
            _importable = False
    return _importable


@torch.compiler.assume_constant_result
def _arch_major(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    if device not in _majors:
        _majors[device] = torch.cuda.get_device_capability(device)[0]
    return _majors[device]


def fa4_problem() -> str | None:
    """Why FA4 cannot run here (None when it can)."""
    if not fa4_importable():
        return "flash_attn.cute (flash-attn-4) does not import; install fastattn[fa4]"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"the GPU is sm_{major}{minor}; FlashAttention-4 runs on SM90 and SM100"
    return None


def set_fa4(mode) -> None:
    """``auto`` | ``on`` | ``off`` (YAML true / false mean on / off): the dispatcher's FA4 mode."""
    configure(fa4=mode)


def get_fa4() -> str:
    return current().fa4


def fa4_mode(mode):
    """The mode inside the block (benchmarks: a raw row on cuDNN next to one on FA4); the
    dispatcher's restoring context manager."""
    return attention_backend(fa4=mode)


def _head_dims_ok(q: torch.Tensor, v: torch.Tensor, major: int) -> bool:
    limit = 256 if major == 9 else 128
    return all(8 <= d <= limit and d % 8 == 0 for d in (q.shape[-1], v.shape[-1]))


def enabled_for(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """Whether the kernels run these [batch, heads, seq, head_dim] inputs through FA4."""
    if current().fa4 == "off" or q.dtype not in FA4.dtypes:
        return False
    major = _arch_major(q.device)
    return major in (9, 10) and _head_dims_ok(q, q if v is None else v, major) and fa4_importable()


def sparse_enabled_for(q: torch.Tensor) -> bool:
    """Block-sparse routes: SM90 only (where they were measured)."""
    return enabled_for(q) and _arch_major(q.device) == 9


def _usable(q: torch.Tensor, v: torch.Tensor | None, kind: str) -> bool:
    if kind in ("dense", "window", "refresh"):
        return enabled_for(q, v)
    # block-sparse; the arrow runs on FlexAttention where its blocks are not whole, so it needs both
    return sparse_enabled_for(q) and (kind != "arrow" or flex.flex_available(q))


# The GPU generation, head dims (8..256 on SM90, ..128 on SM100) and the mode are checked by enabled_for.
FA4 = register(Backend("fa4", KINDS, needs="flash-attn-4 (fastattn[fa4]), an SM90/SM100 GPU (SM90 for the "
                       "block-sparse kinds), fp16/bf16 inputs and fa4 not off",
                       dtypes=_HALF, min_head_dim=8, usable=_usable, problem=lambda: fa4_problem()))


# -- block-sparse descriptions ------------------------------------------------------------------

@dataclass(frozen=True)
class Blocks:
    """Which key blocks each query block visits, FA4's ``BlockSparseTensorsTorch`` fields:
    counts [batch, heads, q_blocks] and ascending indices [batch, heads, q_blocks, k_blocks]
    (batch and heads may be 1: broadcast). ``partial`` blocks get the mask per element, ``full``
    ones none. Ascending order matters: FA4 masks the sequence end only in the last block of
    each list, so the block cut by the end must come last."""

    partial_count: torch.Tensor
    partial_index: torch.Tensor
    full_count: torch.Tensor
    full_index: torch.Tensor
    size: tuple[int, int]  # (query block, key block) tokens


@dataclass(frozen=True)
class Mask:
    """A per-element mask for the partial blocks, by name: ``offband`` (|q - k| > aux[0][0]),
    ``tile2d`` (params: radius, grid width; the square neighbourhood on a row-major grid) and
    ``video`` (params: radius; aux: each token's tile coordinates along the three axes)."""

    kind: str
    params: tuple[int, ...] = ()
    aux: tuple[torch.Tensor, ...] = ()


def _ascending(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # kept blocks first, ascending
    return m.sum(-1).to(torch.int32), order.to(torch.int32)


def blocks_from_matrices(full: torch.Tensor, partial: torch.Tensor, size: tuple[int, int]) -> Blocks:
    """From boolean [..., q_blocks, k_blocks] matrices (leading dims broadcast to [batch, heads])."""
    while full.dim() < 4:
        full, partial = full[None], partial[None]
    pc, pi = _ascending(partial)
    fc, fi = _ascending(full)
    return Blocks(pc, pi, fc, fi, tuple(size))


def blocks_from_block_mask(block_mask) -> Blocks:
    """A FlexAttention ``BlockMask`` (its indices are ascending already): no copy."""
    size = tuple(block_mask.BLOCK_SIZE)
    return Blocks(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                  block_mask.full_kv_indices, size)


def block_ranges(seq_len: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last token index of each block (the last block cut by the sequence end)."""
    start = torch.arange(-(-seq_len // block), device=device) * block
    return start, torch.clamp(start + block, max=seq_len) - 1


@functools.lru_cache(maxsize=64)
def offband_blocks(seq_len: int, half_width: int, size: tuple[int, int], device: torch.device) -> Blocks:
    """The keys outside the band |q - k| <= half_width: blocks wholly outside it are full,
    blocks the band edge crosses are partial, blocks wholly inside are skipped."""
    q0, q1 = block_ranges(seq_len, size[0], device)
    k0, k1 = block_ranges(seq_len, size[1], device)
    nearest = torch.clamp(torch.maximum(k0[None] - q1[:, None], q0[:, None] - k1[None]), min=0)
    farthest = torch.maximum(q1[:, None] - k0[None], k1[None] - q0[:, None])
    full = nearest > half_width
    inside = farthest <= half_width
    return blocks_from_matrices(full, ~full & ~inside, size)


# Tile configurations (tile_m, tile_n, P·V from registers, intra-warpgroup overlap) for the band
# by head dim where one beats FA4's own choice, and block shapes of the refresh's off-band pass
# likewise (experiments/bench/fa4_tiles.py). Empty: on an H200 no candidate was 2% faster at head
# dims 72 and 128 (BENCHMARKS.md, FA4 section).
WINDOW_TILES: dict[int, tuple[int, int, bool, bool]] = {}
REFRESH_BLOCKS: dict[int, tuple[int, int]] = {}


def refresh_block_size(head_dim: int) -> tuple[int, int]:
    """Block shape of the off-band pass: :data:`REFRESH_BLOCKS`, else FA4's own SM90 dense tile
    for the head dim (192 x 144 at 72), so the sparse pass runs the dense kernel's tile configuration."""
    if head_dim in REFRESH_BLOCKS:
        return REFRESH_BLOCKS[head_dim]
    if head_dim <= 64:
        return (192, 128)
    if head_dim <= 96:
        return (192, 144)
    return (128, 128)


@functools.lru_cache(maxsize=64)
def _scalar(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32, device=device)


# -- the call -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cute_mask(kind: str, params: tuple[int, ...]):
    """The CuTe-DSL mask_mod of a :class:`Mask` (FA4 compiles one kernel per distinct one)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils

    ssa = fa_utils.scalar_to_ssa
    if kind == "offband":
        @cute.jit
        def keep(b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
            w = ssa(aux_tensors[0][0], cutlass.Int32)
            d = q_idx - kv_idx
            return (d > w) | (d < -w)
    elif kind == "tile2d":
        radius, width = params

        @cute.jit
        def keep(b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
            r, g = ssa(radius, cutlass.Int32), ssa(width, cutlass.Int32)
            dr = q_idx // g - kv_idx // g
            dc = q_idx % g - kv_idx % g
            return (dr <= r) & (dr >= -r) & (dc <= r) & (dc >= -r)
    elif kind == "video":
        (radius,) = params

        @cute.jit
        def keep(b, h, q_idx, kv_idx, seqlen_info, aux_tensors):
            r = ssa(radius, cutlass.Int32)
            tf, th, tw = aux_tensors[0], aux_tensors[1], aux_tensors[2]
            df = ssa(tf[q_idx[0]], cutlass.Int32) - ssa(tf[kv_idx[0]], cutlass.Int32)
            dh = ssa(th[q_idx[0]], cutlass.Int32) - ssa(th[kv_idx[0]], cutlass.Int32)
            dw = ssa(tw[q_idx[0]], cutlass.Int32) - ssa(tw[kv_idx[0]], cutlass.Int32)
            return (df <= r) & (df >= -r) & (dh <= r) & (dh >= -r) & (dw <= r) & (dw >= -r)
    else:
        raise ValueError(f"fa4: unknown mask kind {kind!r}")
    return keep


def _run(q, k, v, window, blocks: Blocks | None, mask: Mask | None, want_lse: bool, tile=None):
    """FA4 forward on [batch, seq, heads, head_dim] tensors: (out in that layout, lse [batch, heads, seq] or None)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    kwargs = {}
    if tile is not None:
        kwargs.update(tile_mn=(tile[0], tile[1]), mma_pv_is_rs=bool(tile[2]), intra_wg_overlap=bool(tile[3]))
    if window is not None:
        kwargs.update(window_size_left=window[0], window_size_right=window[1])
    if blocks is not None:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        kwargs["block_sparse_tensors"] = BlockSparseTensorsTorch(
            mask_block_cnt=blocks.partial_count, mask_block_idx=blocks.partial_index,
            full_block_cnt=blocks.full_count, full_block_idx=blocks.full_index, block_size=blocks.size)
    if mask is not None:
        kwargs["mask_mod"] = _cute_mask(mask.kind, mask.params)
        if mask.aux:
            kwargs["aux_tensors"] = list(mask.aux)
    out, lse, *_ = _flash_attn_fwd(q, k, v, return_lse=want_lse, **kwargs)
    return out, lse


@torch.library.custom_op("fastattn::fa4_attention", mutates_args=())
def _fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: list[int], blocks: list[torch.Tensor],
            block_size: list[int], mask: str, params: list[int], aux: list[torch.Tensor], want_lse: bool,
            tile: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    b = Blocks(*blocks, tuple(block_size)) if blocks else None
    m = Mask(mask, tuple(params), tuple(aux)) if mask else None
    out, lse = _run(q, k, v, tuple(window) if window else None, b, m, want_lse, tuple(tile) if tile else None)
    return out, lse if lse is not None else q.new_empty(0, dtype=torch.float32)


@_fa4_op.register_fake
def _(q, k, v, window, blocks, block_size, mask, params, aux, want_lse, tile):
    batch, seq, heads, _ = q.shape
    lse = q.new_empty((batch, heads, seq) if want_lse else (0,), dtype=torch.float32)
    return q.new_empty(batch, seq, heads, v.shape[-1]), lse


def attend(q, k, v, *, window: tuple[int, int] | None = None, blocks: Blocks | None = None,
           mask: Mask | None = None, want_lse: bool = False, tile: tuple | None = None):
    """FA4 attention of [batch, heads, seq, head_dim] inputs: (out as a [batch, heads, seq,
    head_dim] view, lse [batch, heads, seq] float32 or None). ``tile``: a :data:`WINDOW_TILES` entry."""
    ql, kl, vl = (t.transpose(1, 2) for t in (q, k, v))
    if torch.compiler.is_compiling():
        fields = [blocks.partial_count, blocks.partial_index, blocks.full_count, blocks.full_index] if blocks else []
        out, lse = _fa4_op(ql, kl, vl, list(window or ()), fields, list(blocks.size) if blocks else [],
                           mask.kind if mask else "", list(mask.params) if mask else [],
                           list(mask.aux) if mask else [], want_lse, [int(x) for x in tile] if tile else [])
        lse = lse if want_lse else None
    else:
        out, lse = _run(ql, kl, vl, window, blocks, mask, want_lse, tile)
    return out.transpose(1, 2), lse


# -- kernels ------------------------------------------------------------------------------------

def dense(q, k, v) -> torch.Tensor:
    return attend(q, k, v)[0]


def window(q, k, v, half_width: int) -> torch.Tensor:
    """The band |q - k| <= half_width (FA4's local attention)."""
    return attend(q, k, v, window=(half_width, half_width), tile=WINDOW_TILES.get(q.shape[-1]))[0]


REFRESH_ROUTES = ("merge", "two_pass")
# The merge route from this many tokens, two passes below (measured on an H200, BENCHMARKS.md:
# merge 5.29 against 5.95 ms at 16,384 tokens, 0.52 against 0.49 ms at 4,096, GPU time)
MERGE_FROM_TOKENS = 8192


def refresh(q, k, v, half_width: int, route: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WA-RS refresh (O, R = O - W). ``merge``: the band with its log-sum-exp, the off-band keys
    with theirs, one merge pass; ``two_pass``: dense, band, subtraction; default by length."""
    route = route or ("merge" if q.shape[-2] >= MERGE_FROM_TOKENS else "two_pass")
    if route == "two_pass":
        o = dense(q, k, v)
        return o, o - window(q, k, v, half_width)
    if route != "merge":
        raise ValueError(f"fa4 refresh route must be one of {', '.join(REFRESH_ROUTES)}, got {route!r}")
    from .merge import merge_refresh

    seq = q.shape[-2]
    w, lse_w = attend(q, k, v, window=(half_width, half_width), want_lse=True, tile=WINDOW_TILES.get(q.shape[-1]))
    blocks = offband_blocks(seq, half_width, refresh_block_size(q.shape[-1]), q.device)
    x, lse_x = attend(q, k, v, blocks=blocks, mask=Mask("offband", (), (_scalar(half_width, q.device),)),
                      want_lse=True)
    o, r = merge_refresh(w.transpose(1, 2), lse_w, x.transpose(1, 2), lse_x)
    return o.transpose(1, 2), r.transpose(1, 2)


def sparse(q, k, v, blocks: Blocks, mask: Mask | None = None) -> torch.Tensor:
    return attend(q, k, v, blocks=blocks, mask=mask)[0]


# -- the unmodified model's own attention calls -------------------------------------------------

def _sdpa_router(original):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        # under a TorchFunctionMode (fastattn.core_call's, replacing a wrapped layer's attention)
        # the call goes to torch's function, where the mode sees it
        if (torch._C._len_torch_function_stack() == 0 and attn_mask is None and dropout_p == 0.0 and not is_causal and not kwargs.get("enable_gqa", False)
                and query.dim() == 4 and key.shape[1] == query.shape[1] == value.shape[1]
                and (scale is None or scale == query.shape[-1] ** -0.5)
                and not (torch.is_grad_enabled() and query.requires_grad) and choose(query, "dense", value) == "fa4"):
            return dense(query, key, value)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    sdpa.fastattn_router = True
    return sdpa


@contextlib.contextmanager
def route_sdpa():
    """Inside the block, mask-free ``F.scaled_dot_product_attention`` calls whose inputs FA4 takes
    (what diffusers' processors and its native dispatcher backend make) run on FA4; any other call
    goes to SDPA unchanged. diffusers' own FlashAttention-4 backend (``flash_4_hub``) downloads
    its kernel from the Hub through the ``kernels`` package and only serves models that call its
    dispatcher (not PixArt, DiT or SD3, whose processors call SDPA directly), hence this."""
    import torch.nn.functional as F

    if current().fa4 == "off" or getattr(F.scaled_dot_product_attention, "fastattn_router", False) \
            or not fa4_importable():
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_router(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
