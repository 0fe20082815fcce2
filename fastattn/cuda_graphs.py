"""CUDA graphs of the compressed transformer: one graph per distinct step layout.

A compressed step launches many small kernels (per layer: projections, a window or a half-batch
kernel, a residual add), and at 1024-4096 tokens the host cannot issue them as fast as the GPU
runs them (BENCHMARKS.md: 0.4-1 ms of CPU per layer call against 0.3 ms of GPU work). A graph
replays the whole forward with one launch.

What a step does is fixed by its *layout*: each layer's method, refresh and keep flags, and the
CFG branch (whose caches it uses). Steps with the same layout run the same kernels on the same
buffers, so :class:`StepGraphs` runs a layout eagerly the first time it sees it (the warm-up: it
compiles FlexAttention and allocates the caches), captures it right after, and replays it from
then on, also across generations and plans: from the second generation on, every step replays. This needs the caches to stay at fixed
addresses: in *static-cache* mode (:attr:`FamilyState.static_caches`) a layer overwrites its
output and residual buffers in place instead of rebinding them, and never frees them. Steps are
idempotent given their inputs and the caches they read (no step reads a buffer it writes), so
running a step eagerly before capturing it changes nothing.

Every replay first checks that the caches the graph was captured with are still the layers'
current buffers (a pointer comparison); a cache reallocated since (its shape changed with the
batch) makes the graph stale, and the layout is captured again instead of touching freed memory. On a CPU the same bookkeeping runs in ``emulate`` mode (the forward re-runs eagerly on
the static inputs), which is what the unit tests exercise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


def _leaf_signature(x) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device, x.stride())
    try:
        hash(x)
    except TypeError:
        return ("value", repr(x))
    return ("value", x)


def warm_up_on_side_stream(fn: Callable[[], object], times: int = 1) -> None:
    """Run ``fn`` ``times`` times on a side stream, as CUDA graph captures want first: libraries
    initialise per-stream state on first use, which must not happen inside a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when emulating
    outputs: Any  # the forward's outputs as captured (overwritten by each replay)
    cache_pointers: tuple  # the cache buffers' addresses the graph reads and writes


class StepGraphs:
    """Capture and replay one graph per step layout of a transformer with fastattn applied.

    ``mode``: ``"cuda"`` (real CUDA graphs) or ``"emulate"`` (the same bookkeeping, eager
    execution; for tests and CPUs). ``capture_at``: how many times a layout runs eagerly before
    it is captured (at least 1: the eager run is the warm-up); every later call replays.
    """

    def __init__(self, processors: list, mode: str = "cuda", capture_at: int = 1, module=None):
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"cuda graphs mode must be 'cuda' or 'emulate', got {mode!r}")
        if capture_at < 1:
            raise ValueError(f"cuda graphs capture_at must be >= 1 (the first run warms up), got {capture_at}")
        if mode == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("cuda graphs need a CUDA device; use mode='emulate' to test the bookkeeping on a CPU")
        self.processors = processors
        # The weights a graph reads: model CPU offloading moves the transformer off the GPU after a
        # generation and back at new addresses, and a moved weight makes every graph stale.
        params = list(module.parameters()) if module is not None else []
        self._weights = [params[0], params[-1]] if params else []
        self.mode = mode
        self.capture_at = capture_at
        self.enabled = True  # False: every call runs eagerly (e.g. while timing hooks record events)
        self.graphs: dict[Any, _Graph] = {}
        self.seen: dict[Any, int] = {}
        self.failed: dict[Any, str] = {}  # layouts whose capture raised, with the reason
        self.stats = {"eager": 0, "captured": 0, "replayed": 0, "stale": 0}
        self._static_inputs: dict[Any, list] = {}  # input signature -> static copies of the inputs
        self._pool = None
        self._warmed_up = False

    # -- bookkeeping ----------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every graph (and the static inputs); the next calls run eagerly again."""
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()
        self._static_inputs.clear()

    def _cache_pointers(self) -> tuple:
        return tuple((c.data_ptr() if c is not None else 0) for p in self.processors for c in p.park()) + \
            tuple(w.data_ptr() for w in self._weights)

    def _caches_in_place(self, entry: _Graph) -> bool:
        """Whether every cache the graph was captured with is still the layer's buffer (a
        cache is reallocated when its shape changes, e.g. another batch size), and the weights
        still where they were (model CPU offloading moves them between generations)."""
        now = self._cache_pointers()
        return all(not was or was == is_ for was, is_ in zip(entry.cache_pointers, now))

    # -- the call -------------------------------------------------------------------------
    def run(self, forward: Callable, layout, args: tuple, kwargs: dict):
        """``forward(*args, **kwargs)``, eagerly or through the graph of ``layout`` and these
        input shapes."""
        if not self.enabled:
            return forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        signature = (spec, tuple(_leaf_signature(x) for x in leaves))
        key = (layout, signature)
        entry = self.graphs.get(key)
        if entry is not None and not self._caches_in_place(entry):
            del self.graphs[key]  # its buffers are gone: capture it again
            self.seen[key] = 0
            self.stats["stale"] += 1
            entry = None
        if entry is None:
            # Eager (this run doubles as the warm-up: compiles kernels, allocates the caches),
            # then capture right away, so the next sighting of the layout already replays.
            seen = self.seen[key] = self.seen.get(key, 0) + 1
            self.stats["eager"] += 1
            out = forward(*args, **kwargs)
            if seen >= self.capture_at and key not in self.failed:
                self._capture(forward, key, signature, leaves, spec)
            return out
        return self._replay(forward, entry, signature, leaves, spec)

    def _load_inputs(self, signature, leaves: list) -> list:
        static = self._static_inputs.get(signature)
        if static is None:  # one set per input signature, shared by all its graphs
            static = self._static_inputs[signature] = [x.clone() if isinstance(x, torch.Tensor) else x
                                                       for x in leaves]
        else:
            for buffer, x in zip(static, leaves):
                if isinstance(x, torch.Tensor):
                    buffer.copy_(x)
        return static

    def _capture(self, forward, key, signature, leaves, spec) -> _Graph | None:
        args, kwargs = pytree.tree_unflatten(self._load_inputs(signature, leaves), spec)
        if self.mode == "emulate":
            entry = _Graph(None, forward(*args, **kwargs), ())
        else:
            try:
                entry = self._capture_cuda(forward, args, kwargs)
            except Exception as err:  # noqa: BLE001 - any capture failure: run this layout eagerly
                self.failed[key] = f"{type(err).__name__}: {err}"
                warnings.warn(f"cuda graphs: capturing a step layout failed, it runs eagerly ({self.failed[key]})",
                              stacklevel=3)
                return None
        entry.cache_pointers = self._cache_pointers()
        self.graphs[key] = entry
        self.stats["captured"] += 1
        return entry

    def _capture_cuda(self, forward, args, kwargs) -> _Graph:
        if not self._warmed_up:  # (running the step once more is harmless: steps are idempotent)
            warm_up_on_side_stream(lambda: forward(*args, **kwargs))
            self._warmed_up = True
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # all layouts share one memory pool
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = forward(*args, **kwargs)
        return _Graph(graph, outputs, ())

    def _replay(self, forward, entry: _Graph, signature, leaves, spec):
        static = self._load_inputs(signature, leaves)
        if self.mode == "emulate":
            args, kwargs = pytree.tree_unflatten(static, spec)
            fresh = forward(*args, **kwargs)
            for buffer, new in zip(pytree.tree_leaves(entry.outputs), pytree.tree_leaves(fresh)):
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(new)
        else:
            entry.graph.replay()
        self.stats["replayed"] += 1
        # The graph overwrites its outputs at the next replay: hand out copies (latent-sized).
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.outputs)


__all__ = ["StepGraphs", "warm_up_on_side_stream"]
