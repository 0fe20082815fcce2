"""Attention entry points used by the processor: dense, windowed, and the WA-RS refresh.

All take and return [batch, heads, seq, head_dim]. Backends, picked per call from the device
and overridable with :func:`set_window_backend`:

* ``flex``: FlexAttention with a cached block mask, compiled once per shape (the CUDA default:
  faster than our Triton kernels on an H100, see BENCHMARKS.md);
* ``triton``: the band kernels of :mod:`.triton_band`, including the one-pass refresh;
* ``sdpa``: SDPA with a boolean mask: exact but dense work (the CPU path).

The 2-D ``tile`` window always runs through FlexAttention on CUDA and masked SDPA elsewhere.
Dense attention is SDPA; :func:`prefer_fast_dense` makes SDPA try cuDNN first (the fastest
dense kernel on Hopper), for the raw model and the compressed one alike.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .masks import band_mask_mod, dense_mask, tile_mask_mod
from .triton_band import triton_available, triton_refresh, triton_window

WINDOW_BACKENDS = ("auto", "triton", "flex", "sdpa")
_window_backend = "auto"


def set_window_backend(name: str) -> None:
    global _window_backend
    if name not in WINDOW_BACKENDS:
        raise ValueError(f"window backend must be one of {', '.join(WINDOW_BACKENDS)}, got {name!r}")
    _window_backend = name


def get_window_backend() -> str:
    return _window_backend


@contextlib.contextmanager
def prefer_fast_dense():
    """SDPA backend priority cuDNN > flash > efficient > math inside the block (CUDA only)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        ctx = sdpa_kernel(order, set_priority=True)
    except (ImportError, TypeError, AttributeError):  # older torch: keep its default order
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Same call as diffusers' AttnProcessor2_0, so a refresh step reproduces the model's output.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


@functools.lru_cache(maxsize=32)
def _bool_mask(kind: str, seq_len: int, size: int, grid_width: int, device: torch.device) -> torch.Tensor:
    return dense_mask(_mask_mod(kind, size, grid_width), seq_len, seq_len, device=device)


def _mask_mod(kind: str, size: int, grid_width: int):
    return band_mask_mod(size) if kind == "band" else tile_mask_mod(size, grid_width)


def _flex_available(q: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # torch < 2.5
        return False
    return True


@functools.lru_cache(maxsize=32)
def _block_mask(kind: str, seq_len: int, size: int, grid_width: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_mask_mod(kind, size, grid_width), None, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Every window size and sequence length is its own compiled kernel; past dynamo's default
    # recompile limit (8) flex_attention would silently fall back to eager dense math, which
    # materialises the whole L x L score matrix.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def _backend_for(q: torch.Tensor) -> str:
    if _window_backend != "auto":
        if _window_backend == "triton" and not triton_available(q):
            raise RuntimeError("window backend 'triton' needs CUDA, Triton, fp16/bf16 inputs and head_dim >= 16")
        if _window_backend == "flex" and not _flex_available(q):
            raise RuntimeError("window backend 'flex' needs CUDA and torch >= 2.5")
        return _window_backend
    if _flex_available(q):
        return "flex"
    return "triton" if triton_available(q) else "sdpa"


def _masked(q, k, v, kind: str, size: int, grid_width: int, backend: str) -> torch.Tensor:
    seq_len = q.shape[-2]
    if backend == "flex":
        mask = _block_mask(kind, seq_len, size, grid_width, q.device)
        return _compiled_flex()(q, k, v, block_mask=mask)
    mask = _bool_mask(kind, seq_len, size, grid_width, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def window_attention(q, k, v, half_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Attention restricted to keys with |q_idx - k_idx| <= half_width, plus ``residual`` if given."""
    seq_len = q.shape[-2]
    if half_width >= seq_len - 1:
        out = dense_attention(q, k, v)
    else:
        backend = _backend_for(q)
        if backend == "triton":
            return triton_window(q, k, v, half_width, residual)
        out = _masked(q, k, v, "band", half_width, 0, backend)
    return out if residual is None else out + residual


def tile_attention(q, k, v, radius: int, grid_width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Attention restricted to a (2r+1)^2 square of the latent grid around each query token."""
    backend = "flex" if _flex_available(q) else "sdpa"
    out = _masked(q, k, v, "tile", radius, grid_width, backend)
    return out if residual is None else out + residual


def refresh_attention(q, k, v, half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The WA-RS refresh step: full attention O and the residual R = O - W.

    With the ``triton`` backend both come from one pass over the keys; otherwise from the best
    dense kernel plus the window kernel (faster on an H100 today, see BENCHMARKS.md).
    """
    if half_width < q.shape[-2] - 1 and _backend_for(q) == "triton":
        return triton_refresh(q, k, v, half_width)
    o = dense_attention(q, k, v)
    return o, o - window_attention(q, k, v, half_width)
