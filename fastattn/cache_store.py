"""How processors keep their cross-step caches: as computed, in FP8 with a per-head scale, or in host memory.

The caches a plan keeps from one step to a later one (AST layer outputs, WA-RS residuals,
head-wise per-head outputs and residuals) can hold as much memory as the model's activations at
2048². A :class:`CacheStore` on the family's state changes how they are kept, not what they are:

- ``dtype="float8_e4m3fn"``: quantised when written, with one float32 scale per sample and head
  (amax / 448, the largest e4m3 value) and dequantised to the compute dtype when read. Per-head
  tensors ``[batch, heads, tokens, head_dim]`` (residuals, head-wise outputs) get a scale per
  (sample, head); a layer's output ``[batch, tokens, channels]`` (AST) has no heads left after the
  output projection mixed them, and gets one per (sample, channel). A sample's cache never
  depends on the other samples of its batch.
- ``device="cpu"``: kept in host memory and brought back when read. When the model runs on
  CUDA the buffers are pinned and reused from step to step, the copies run on side streams, and
  each call's reads are fetched a few layers ahead of use (:mod:`fastattn.cache_prefetch`), so
  the GPU holds about the model's activations plus a few caches in flight.

Without a store (the default) a cache is the computed tensor itself, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache_prefetch import PREFETCH_DEPTH, CudaCopies, Prefetcher, copy_now, read_order

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
CACHE_DTYPES = {"float8_e4m3fn": FP8}
CACHE_DEVICES = ("cpu",)


def scale_dims(shape: torch.Size | tuple) -> tuple[int, ...]:
    """The dims one scale covers: tokens and head_dim of ``[batch, heads, tokens, head_dim]``,
    tokens of ``[batch, tokens, channels]``, else everything but the batch."""
    if len(shape) == 4:
        return (2, 3)
    if len(shape) == 3:
        return (1,)
    return tuple(range(1, len(shape)))


def quantize_fp8(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales) with ``x ≈ values * scales``: one scale per slice over ``dims``
    (default :func:`scale_dims`), amax / 448, so each slice's largest magnitude maps to 448. An
    all-zero slice gets scale 1 (its values stay zero)."""
    dims = scale_dims(x.shape) if dims is None else dims
    # amax in x's dtype is exact, and x / scale promotes to float32: one float32 temporary, not two
    scale = x.abs().amax(dim=dims, keepdim=True).float() / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values * scale`` in ``dtype`` (the multiply in float32)."""
    return values.float().mul_(scale).to(dtype)


@dataclass(eq=False)  # compared (and hashed) by identity: one object per cache written
class StoredCache:
    """One cache as a store keeps it: ``data`` (FP8 or the compute dtype, on the store's device),
    ``scale`` (FP8 only), and the dtype and device the processors compute in. Host caches of a
    CUDA model carry the events of their side-stream copies (:class:`~fastattn.cache_prefetch.CudaCopies`)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype
    device: torch.device
    written: Any = None  # CUDA event: the device→host copy into ``data`` is done (None: nothing pending)
    read: Any = None  # CUDA event: the last prefetch out of ``data`` is done
    owner: Any = None  # the CudaCopies whose pinned buffers these are: given back to it when this cache goes

    def __del__(self):
        owner = self.owner
        if owner is not None:
            owner.give_back(self.data, self.scale, self.read)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def data_ptr(self) -> int:  # what CUDA graphs compare to know their buffers are still in place
        return self.data.data_ptr()

    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)


def parse_cache_dtype(value) -> torch.dtype | None:
    """None, or FP8 e4m3 from ``"float8_e4m3fn"`` / ``torch.float8_e4m3fn``; anything else is a one-line ValueError."""
    if value is None or value == FP8:
        return value
    if isinstance(value, str) and value in CACHE_DTYPES:
        return CACHE_DTYPES[value]
    raise ValueError(f"cache_dtype must be null or one of {', '.join(CACHE_DTYPES)}, got {value!r}")


def parse_cache_device(value) -> torch.device | None:
    """None (caches stay beside the model), or the host (``"cpu"``); anything else is a one-line ValueError."""
    if value is None:
        return None
    if str(value) in CACHE_DEVICES:
        return torch.device(str(value))
    raise ValueError(f"cache_device must be null or one of {', '.join(CACHE_DEVICES)}, got {value!r}")


def parse_cache_options(cache_dtype, cache_device, cuda_graphs: bool = False) -> tuple[torch.dtype | None,
                                                                                        torch.device | None]:
    """The one reading of the cache options: (dtype, device) from what a user or a config gives
    (None, strings, or these forms again), and the one place host caches are refused under CUDA
    graphs (a replay cannot move caches to the host). Anything else is a one-line ValueError."""
    dtype, device = parse_cache_dtype(cache_dtype), parse_cache_device(cache_device)
    if cuda_graphs and device is not None:
        raise ValueError("cache_device='cpu' does not run under CUDA graphs (a replay cannot move caches to "
                         "host memory); use cache_dtype='float8_e4m3fn' to shrink the caches there")
    return dtype, device


class CacheStore:
    """Writes and reads one family's caches in ``dtype`` (None: as computed) on ``device``
    (None: where computed). Host caches are prefetched ``prefetch`` reads ahead (0: read when
    used); the handle announces each call's reads with :meth:`begin_call`."""

    def __init__(self, dtype=None, device=None, prefetch: int = PREFETCH_DEPTH):
        self.dtype, self.device = parse_cache_options(dtype, device)
        self.prefetcher = Prefetcher(prefetch, self._start_fetch) if self.device is not None and prefetch else None
        self._cuda: dict[torch.device, CudaCopies] = {}  # side streams per CUDA device the model runs on

    def __repr__(self) -> str:
        return f"CacheStore(dtype={self.dtype}, device={self.device})"

    def put(self, held: StoredCache | None, value: torch.Tensor, static: bool = False) -> StoredCache:
        """``value`` as this store keeps it. ``static`` (CUDA graphs): into ``held``'s buffers, in
        place, where they fit. Host caches of a CUDA model go into ``held``'s pinned buffers where
        they fit (the caller passes ``held`` only when no one reads it any more)."""
        data, scale = quantize_fp8(value) if self.dtype is not None else (value, None)
        if static and held is not None and held.data.shape == data.shape and held.data.dtype == data.dtype \
                and held.data.device == (self.device or data.device):
            held.data.copy_(data, non_blocking=True)
            if scale is not None:
                held.scale.copy_(scale, non_blocking=True)
            return held
        if self.device is not None:
            eager = not torch.compiler.is_compiling()  # inside a compiled layer: plain copies, no streams
            if held is not None and self.prefetcher is not None and eager:
                self.prefetcher.forget(held)
            if value.device.type == "cuda" and not static and eager:
                copies = self._copies(value.device)
                host_data, host_scale, written = copies.write(held, data, scale)
                return StoredCache(host_data, host_scale, value.dtype, value.device, written=written, owner=copies)
            data, scale = (_to_host(t) for t in (data, scale))
        elif static and data is value:
            data = value.clone()  # a graph's buffer of its own, not the step's output
        return StoredCache(data, scale, value.dtype, value.device)

    def get(self, cache: StoredCache) -> torch.Tensor:
        """The cache in the dtype and on the device it was computed in (a new tensor)."""
        fetched = None
        if self.prefetcher is not None and not torch.compiler.is_compiling():
            fetched = self.prefetcher.take(cache)
        data, scale = fetched if fetched is not None else self._read(cache)
        if scale is not None:
            return dequantize_fp8(data, scale, cache.dtype)
        return data.clone() if data is cache.data else data

    def begin_call(self, layer_reads, processors) -> None:
        """A transformer call starts whose layers read ``layer_reads`` (per layer, the slots of its
        processor among ``processors``; None: not known, nothing is fetched ahead)."""
        for copies in self._cuda.values():
            copies.release_writes()
        if self.prefetcher is None:
            return
        caches = [] if layer_reads is None else [getattr(processors[layer], slot)
                                                  for layer, slot in read_order(layer_reads)]
        self.prefetcher.begin([c for c in caches if isinstance(c, StoredCache)])

    def release(self, buffers: bool = False) -> None:
        """Drop fetches under way and held writes (a generation ends), and with ``buffers`` the
        pinned buffers kept for later writes (the handle ends)."""
        if self.prefetcher is not None:
            self.prefetcher.clear()
        for copies in self._cuda.values():
            copies.release_writes()
            if buffers:
                copies.free.clear()

    def _copies(self, device: torch.device) -> CudaCopies:
        if device not in self._cuda:
            self._cuda[device] = CudaCopies(device, self.prefetcher.depth if self.prefetcher else PREFETCH_DEPTH)
        return self._cuda[device]

    def _start_fetch(self, cache: StoredCache):
        if cache.device.type == "cuda" and cache.data.device.type == "cpu":
            return self._copies(cache.device).fetch(cache)
        return copy_now(cache)  # a CPU model (the tests' seam): the same bookkeeping, copies made at once

    def _read(self, cache: StoredCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, scale) on the compute device, copied in the compute stream (no prefetch)."""
        data, scale = cache.data, cache.scale
        if data.device != cache.device:
            if cache.written is not None:
                torch.cuda.current_stream(cache.device).wait_event(cache.written)
            data = data.to(cache.device, non_blocking=True)
            scale = None if scale is None else scale.to(cache.device, non_blocking=True)
        return data, scale


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # pinned: the copy need not block the host
    return host.copy_(t, non_blocking=True)


__all__ = ["CACHE_DEVICES", "CACHE_DTYPES", "CacheStore", "FP8_MAX", "StoredCache", "dequantize_fp8",
           "parse_cache_device", "parse_cache_dtype", "parse_cache_options", "quantize_fp8", "scale_dims"]
