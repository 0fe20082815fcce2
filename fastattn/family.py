"""The contract between the handle (:mod:`fastattn.hooks` and its parts, :mod:`fastattn.features`) and a plan family.

A *plan family* (layer-wise DiTFastAttn in :mod:`fastattn.layerwise`, head-wise DiTFastAttnV2 in
:mod:`fastattn.headwise`) supplies a :class:`FamilyState`, shared by its processors, and the
processors themselves (:class:`CachingProcessor`). The handle counts every transformer call
once and tells the state what the call is (:class:`CallInfo`); the state then sets up what each
layer does for that call. Caches live on the processors and are kept per CFG branch by the
handle, so no family counts steps or tracks branches itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .cache_store import CacheStore, StoredCache
from .processor_args import ProcessorArgs, show_signature

log = logging.getLogger("fastattn")

# Where the conditional samples sit in a CFG batch (both branches in one call).
COND_FIRST, UNCOND_FIRST = "cond_first", "uncond_first"
# Features of the handle a family may support (:attr:`FamilyState.supports`): its plans replay from
# CUDA graphs; its layers stack with block caches, diffusers' hooks or cache-dit's (``state.blocks_may_skip``
# then set per generation).
CUDA_GRAPHS, BLOCK_CACHES = "cuda_graphs", "block_caches"
# What a plan does where the calls have another token count than it was searched at (plan.model.seq_len)
OTHER_RESOLUTION = ("warn", "refuse", "allow")


class OtherResolutionError(ValueError):
    """A plan refused (``other_resolution="refuse"``) on calls of another token count than its search's."""


@dataclass(frozen=True)
class CallInfo:
    """One transformer call, as the step counter sees it."""

    step: int  # denoising step, 0-based, from the timestep value
    branch: int  # which call of the step: 0 for the first, 1 for a second (separate CFG) pass
    cfg: str | None = None  # COND_FIRST / UNCOND_FIRST when the batch holds both CFG halves, else None
    grid: tuple[int, int, int] | None = None  # (frames, rows, cols) token grid, when the adapter reads one
    timestep: float | None = None  # the call's timestep value (its first element), None when it has none
    image_tokens: int | None = None  # the latent's tokens (the grid's, or a packed sequence's length), when known

    def cond_half(self, batch: int) -> slice | None:
        """The conditional half of a batch of ``batch`` samples; None without a CFG batch."""
        if self.cfg is None:
            return None
        if batch % 2:
            raise ValueError(f"a CFG batch must be even, got {batch} samples")
        return slice(0, batch // 2) if self.cfg == COND_FIRST else slice(batch // 2, batch)


class FamilyState:
    """What a family's processors share: the plan (None while a search decides instead), and
    for the call being run what each layer does. Subclasses implement :meth:`on_call`."""

    supports: frozenset[str] = frozenset()  # the handle's features its processors run under (CUDA_GRAPHS, ...)

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.plan: Any = None
        self.call: CallInfo | None = None  # the call being run
        self.seq_len: int | None = None  # tokens of this generation's first attention call (a search records them)
        self.other_resolution = "warn"  # OTHER_RESOLUTION: a plan run at another token count warns, stops or runs
        self._warned: set[tuple[int, int]] = set()  # (searched, seen) token counts already warned about
        self.static_caches = False  # CUDA graphs: caches overwritten in place, never freed
        self._seq_len_checked = True  # whether seq_len was compared with the plan's
        self.cache_store: CacheStore | None = None  # FP8 or host caches (None: caches as computed)

    @property
    def step(self) -> int:
        return -1 if self.call is None else self.call.step

    def set_plan(self, plan) -> None:
        """Take ``plan`` (already checked against the model) and precompute its per-step rows."""
        self.plan = plan

    def on_call(self, call: CallInfo) -> None:
        """Set up every layer for ``call``; raise one line if the plan cannot serve it."""
        self.call = call

    def reset(self) -> None:
        """A new generation: forget the call being run and its tokens (the handle drops the caches)."""
        self.call = None
        self.seq_len = None

    def record_seq_len(self, seq_len: int) -> None:
        """The token count of the generation's first attention call (processors call this while
        :attr:`seq_len` is None, so once per generation): kept for a search's plan, and compared
        with the count the plan was searched at. Another count (another resolution) warns once per
        pair of counts, raises :class:`OtherResolutionError` under ``other_resolution="refuse"``,
        and passes silently under ``"allow"``. Inside a ``torch.compile`` graph the count is only
        recorded; the handle checks it at the next transformer call (:meth:`check_seq_len`)."""
        self.seq_len = seq_len
        self._seq_len_checked = False
        if not torch.compiler.is_compiling():
            self.check_seq_len()

    def check_seq_len(self) -> None:
        """Warn about or refuse a recorded token count the plan was not searched at (once)."""
        if self._seq_len_checked or self.seq_len is None:
            return
        self._seq_len_checked = True
        seq_len = self.seq_len
        searched = (getattr(self.plan, "model", None) or {}).get("seq_len") if self.plan is not None else None
        if not searched or int(searched) == seq_len or self.other_resolution == "allow":
            return
        message = f"plan searched at {searched} tokens (plan.model.seq_len) runs on calls of {seq_len} tokens"
        if self.other_resolution == "refuse":
            raise OtherResolutionError(f"{message}: refused (other_resolution='refuse'); search a plan at this "
                                       "resolution, or apply it with other_resolution='warn' or 'allow'")
        if (int(searched), seq_len) not in self._warned:
            self._warned.add((int(searched), seq_len))
            log.warning("%s: another resolution, where its decisions may not hold "
                        "(other_resolution='refuse' stops such runs, 'allow' silences this)", message)

    def cuda_graphs_refusal(self, plan=None) -> str | None:
        """Why ``plan`` (default: the state's) cannot run under CUDA graphs, in one line; None if it can."""
        return None

    def layout(self) -> tuple:
        """What fixes the kernels and buffers of the call being run (the CUDA-graph key)."""
        raise NotImplementedError(f"{type(self).__name__} plans do not run under CUDA graphs yet")

    def plan_layer_keys(self, step: int) -> list[tuple]:
        """What each layer's processor reads at ``step`` of the plan (what a compiled layer guards on)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its layers guard on")

    def call_reads(self) -> list[tuple[str, ...]] | None:
        """Per layer, the cache slots its processor reads at the call being run, in the order it
        reads them (what host caches fetch ahead, :mod:`fastattn.cache_prefetch`); None where
        it is not known in advance (a search deciding)."""
        return None


class CachingProcessor:
    """A processor whose caches (tensors named in ``CACHE_SLOTS``) the handle parks and restores
    per CFG branch, and drops at a new generation. Subclasses set ``self.state`` (their
    family's :class:`FamilyState`) and ``self.inner`` (the layer's own processor, which runs
    the layers a plan leaves full)."""

    CACHE_SLOTS: tuple[str, ...] = ()
    state: FamilyState
    inner: Any

    # diffusers' ``set_attention_backend`` sets ``processor._attention_backend`` where a processor
    # has one: forwarded to the layer's own processor, so full layers run on the user's backend
    # whether it was chosen before or after fastattn was applied.
    @property
    def _attention_backend(self):
        return self.inner._attention_backend  # AttributeError where the own processor has none

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.inner._attention_backend = backend

    def __init__(self):
        self.reset()

    def wrap(self, inner: Any) -> None:
        """Run around ``inner``, the layer's own processor: diffusers is shown its signature, so
        every argument the model passes reaches this processor (:mod:`fastattn.processor_args`)."""
        self.inner = inner
        self.args = ProcessorArgs(inner)
        show_signature(self, self.args)

    def reset(self) -> None:
        for name in self.CACHE_SLOTS:
            setattr(self, name, None)

    def park(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, name) for name in self.CACHE_SLOTS)

    def restore(self, parked: tuple[torch.Tensor | None, ...]) -> None:
        for name, value in zip(self.CACHE_SLOTS, parked, strict=True):
            setattr(self, name, value)

    def _hold(self, buffer: torch.Tensor | StoredCache | None, value: torch.Tensor) -> torch.Tensor | StoredCache:
        """The cache that holds ``value``: ``value`` itself, or with static caches the cache's
        ``buffer`` overwritten in place (a captured CUDA graph reads and writes fixed addresses), or
        what the state's :class:`~fastattn.cache_store.CacheStore` keeps (FP8, host memory).
        ``buffer`` is read only with static caches. A joint layer's output (image, text) is held
        stream by stream."""
        if isinstance(value, tuple):
            buffers = buffer if isinstance(buffer, tuple) else (None,) * len(value)
            return tuple(self._hold(b, v) for b, v in zip(buffers, value, strict=True))
        store = self.state.cache_store
        if store is not None:
            # a store may overwrite ``buffer`` (host caches reuse their pinned memory): not while
            # another slot still holds it (forecast moves the last output into its history)
            shared = sum(getattr(self, name) is buffer for name in self.CACHE_SLOTS) > 1
            return store.put(None if shared else buffer, value, static=self.state.static_caches)
        if not self.state.static_caches or value is buffer:
            return value
        if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype \
                and buffer.device == value.device:
            return buffer.copy_(value)
        return value.clone()

    def _load(self, cache: torch.Tensor | StoredCache | None) -> torch.Tensor | None:
        """A cache as the processor computes with it: the tensor itself, or what a store kept,
        dequantised and back on the model's device (a new tensor the caller may overwrite)."""
        if isinstance(cache, tuple):
            return tuple(self._load(c) for c in cache)
        if isinstance(cache, StoredCache):
            return self.state.cache_store.get(cache)
        return cache
