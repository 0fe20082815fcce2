"""Host caches without stalls: device→host writes and host→device reads on side CUDA streams,
each read started a few reads ahead of its use.

A :class:`~fastattn.cache_store.CacheStore` with ``device="cpu"`` keeps a plan's caches in
pinned host memory. Copied in the compute stream, each read stalls the layer that needs it (at
PixArt 2048², 37.7-75.5 MB a layer, about 1 ms of PCIe each). Here:

- :func:`read_order` (pure) lists, from the family's state, the (layer, slot) reads of the call
  about to run, in the order its layers make them.
- :class:`Prefetcher` (no CUDA in it) keeps at most ``depth`` of them in flight: ``depth`` at
  the call's start, and one more each time a layer takes one. What it fetches and how is a
  ``start(cache) -> Fetch`` function: :func:`copy_now` on a CPU (a copy made at once: the tests'
  seam), :class:`CudaCopies` on CUDA.
- :class:`CudaCopies` does the copies on two side streams (one per direction, so both copy
  engines work) and orders them with events only.

Why events and never ``record_stream``: a block freed with ``record_stream`` goes back to the
allocator only once the other stream's work queued *at the free* is done. The host runs a whole
transformer call ahead of the GPU, so such blocks would pile up (a new allocation each layer)
and the peak would grow by the caches the host is ahead by. Instead every device tensor a side
stream touches is allocated and freed in compute-stream order, and before the compute stream
may reuse its memory the compute stream waits (on the GPU, the host never blocks) for the copy's
event. The peak then grows by at most ``depth`` caches in flight each way.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import torch

PREFETCH_DEPTH = 2  # caches in flight per direction: two layers of compute to hide one copy behind


def read_order(layer_reads: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """(layer, slot) of every cache read a call makes, in the order it makes them: layer by
    layer, each layer's slots in its processor's order (a slot read twice is listed twice)."""
    return [(layer, slot) for layer, slots in enumerate(layer_reads) for slot in slots]


class Fetch:
    """One host→device copy under way: ``wait()`` gives (data, scale) to compute with, ``drop()``
    gives its memory back unused."""

    def __init__(self, data, scale, done=None):
        self.data, self.scale, self.done = data, scale, done

    def wait(self):
        if self.done is not None:
            torch.cuda.current_stream(self.data.device).wait_event(self.done)
        return self.data, self.scale

    def drop(self) -> None:
        self.wait()  # the compute stream must not reuse the memory before the copy into it is done


def copy_now(cache) -> Fetch:
    """A fetch done at once, without streams: a copy of ``cache``'s tensors on its compute device."""
    copy = lambda t: None if t is None else t.to(cache.device, copy=True)  # noqa: E731
    return Fetch(copy(cache.data), copy(cache.scale))


class Prefetcher:
    """The reads of one call (:meth:`begin`), fetched ``depth`` ahead of use (:meth:`take`).

    ``hits`` / ``misses`` count reads served from a fetch or not; ``most_in_flight`` is the
    largest number of fetches held at once (never above ``depth``)."""

    def __init__(self, depth: int, start: Callable[..., Fetch]):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.depth, self.start = depth, start
        self.queue: deque = deque()  # caches to read, not yet fetched
        self.in_flight: list[tuple[object, Fetch]] = []
        self.hits = self.misses = self.most_in_flight = 0

    def begin(self, caches: Sequence) -> None:
        """A new call will read ``caches`` in this order: drop what the last call left, start the first ones."""
        self.clear()
        self.queue.extend(caches)
        self._top_up()

    def take(self, cache):
        """(data, scale) of ``cache`` from its fetch, or None (a miss: the caller reads it itself)."""
        for i, (held, fetch) in enumerate(self.in_flight):
            if held is cache:
                del self.in_flight[i]
                self.hits += 1
                self._top_up()
                return fetch.wait()
        self._remove_queued(cache)  # read now without a fetch: not fetched later
        self.misses += 1
        self._top_up()
        return None

    def forget(self, cache) -> None:
        """``cache`` is overwritten or gone: its fetches are not wanted."""
        while self._remove_queued(cache):
            pass
        for held, fetch in [e for e in self.in_flight if e[0] is cache]:
            fetch.drop()
        self.in_flight = [e for e in self.in_flight if e[0] is not cache]
        self._top_up()

    def clear(self) -> None:
        for _, fetch in self.in_flight:
            fetch.drop()
        self.in_flight.clear()
        self.queue.clear()

    def _remove_queued(self, cache) -> bool:
        for i, queued in enumerate(self.queue):
            if queued is cache:
                del self.queue[i]
                return True
        return False

    def _top_up(self) -> None:
        while self.queue and len(self.in_flight) < self.depth:
            cache = self.queue.popleft()
            self.in_flight.append((cache, self.start(cache)))
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))


class CudaCopies:
    """Host↔device copies of caches for one CUDA device, on a write stream (device→host) and a
    fetch stream (host→device), ordered with the compute stream and each other by events.

    Orderings (each a GPU-side wait; the host never blocks):

    - a write starts after the compute stream produced the value (event recorded at the write);
    - a write into a reused host buffer (the overwritten cache's, or one of a cache that is gone,
      kept in :attr:`free`: no new pinned memory per write) also waits for the last fetch out of
      it (``cache.read``), so a prefetch of step k's values never reads step k+1's half-written
      ones; a read in the compute stream is before the write's own compute event;
    - a fetch waits for the write that filled its buffer (``cache.written``), and for the compute
      stream to reach the point where its destination was allocated (the allocator handed out
      memory the compute stream may still have been using up to there);
    - the compute stream waits for a fetch before reading it (:meth:`Fetch.wait`), and for a
      write before the device tensor it copies from is let go (at most ``depth`` writes are held;
      the rest, and all at each call's start, are let go in order).
    """

    def __init__(self, device: torch.device, depth: int = PREFETCH_DEPTH):
        self.device, self.depth = device, depth
        self.write_stream = torch.cuda.Stream(device)
        self.fetch_stream = torch.cuda.Stream(device)
        self.pending: deque = deque()  # (written event, device tensors it copies from)
        # Pinned buffers of caches that are gone, by (shape, dtype, scale shape): a plan frees a
        # layer's cache after its last read and writes one of the same size a few steps later.
        self.free: dict[tuple, list] = {}
        self.writes = self.reused = 0  # host writes, and those into an earlier cache's buffer (no new pinned memory)

    def give_back(self, data: torch.Tensor, scale: torch.Tensor | None, read) -> None:
        """A host cache is gone: its buffers (and the event of the last fetch out of them) for the next write."""
        self.free.setdefault(_key(data, scale), []).append((data, scale, read))

    def write(self, held, data: torch.Tensor, scale: torch.Tensor | None):
        """(host data, host scale, written event): ``data`` / ``scale`` copied into ``held``'s host
        buffers where they fit (``held`` is no longer read by anyone), else into a gone cache's,
        else into new pinned ones."""
        compute = torch.cuda.current_stream(self.device)
        key, last_read, reused = _key(data, scale), None, True
        if held is not None and held.owner is self and _key(held.data, held.scale) == key:
            host_data, host_scale, last_read = held.data, held.scale, held.read
            held.owner = None  # the buffers pass to the new cache: not given back when ``held`` goes
        elif self.free.get(key):
            host_data, host_scale, last_read = self.free[key].pop()
        else:
            host_data = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host_scale = None if scale is None else torch.empty(scale.shape, dtype=scale.dtype, pin_memory=True)
            reused = False
        stream = self.write_stream
        stream.wait_event(compute.record_event())
        if last_read is not None:  # a fetch may still be reading the buffer's old values
            stream.wait_event(last_read)
        with torch.cuda.stream(stream):
            host_data.copy_(data, non_blocking=True)
            if scale is not None:
                host_scale.copy_(scale, non_blocking=True)
        written = stream.record_event()
        self.writes += 1
        self.reused += reused
        self.pending.append((written, (data, scale)))
        while len(self.pending) > self.depth:
            self._release(self.pending.popleft())
        return host_data, host_scale, written

    def release_writes(self) -> None:
        """Let go of every device tensor a write copies from (the compute stream waits for them)."""
        while self.pending:
            self._release(self.pending.popleft())

    def _release(self, entry) -> None:
        torch.cuda.current_stream(self.device).wait_event(entry[0])

    def fetch(self, cache) -> Fetch:
        """Start copying ``cache`` (a host cache computed on this device) back, on the fetch stream."""
        compute = torch.cuda.current_stream(self.device)
        data = torch.empty(cache.data.shape, dtype=cache.data.dtype, device=self.device)
        scale = None if cache.scale is None else torch.empty(cache.scale.shape, dtype=cache.scale.dtype,
                                                             device=self.device)
        stream = self.fetch_stream
        stream.wait_event(compute.record_event())
        if cache.written is not None:
            stream.wait_event(cache.written)
        with torch.cuda.stream(stream):
            data.copy_(cache.data, non_blocking=True)
            if scale is not None:
                scale.copy_(cache.scale, non_blocking=True)
        done = stream.record_event()
        cache.read = done
        return Fetch(data, scale, done)


def _key(data: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    return (tuple(data.shape), data.dtype, None if scale is None else tuple(scale.shape))


__all__ = ["CudaCopies", "Fetch", "PREFETCH_DEPTH", "Prefetcher", "copy_now", "read_order"]
