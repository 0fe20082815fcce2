"""The processor that runs one joint-attention layer head by head (DiTFastAttnV2).

Every processor of a transformer shares a :class:`HeadStepState` saying, for the call being
run, each layer's per-head methods and whether the layer must keep its per-head outputs for a
cached head at the next step. A layer whose heads are all ``full`` and need not keep anything
calls the model's own processor, so an all-full plan is bit-identical to the unmodified model.
Otherwise the computing heads (full and arrow) run as one arrow-attention call; cached heads
take their output from the previous step and cost no attention. Steps, CFG branches and the CFG
halves come from the counter (:mod:`fastattn.hooks`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..attention_io import AttentionIO
from ..context_parallel import sequence_shards, ulysses_group
from ..family import CUDA_GRAPHS, CachingProcessor, CallInfo, FamilyState
from ..kernels.arrow import SKIP, arrow_attention, device_constant
from .methods import FULL, HeadMethod
from .ulysses import rank_heads, to_heads, to_sequence


class HeadLayerStep:
    """What one layer does at the call being run, as its processor reads it (see
    :class:`fastattn.layerwise.processor.LayerStep`: compiled layers guard on these values, not on a layer index)."""

    def __init__(self, num_heads: int):
        self.methods: tuple[HeadMethod, ...] = (FULL,) * num_heads
        self.keep = False  # the per-head outputs are cached for a cached head at the next step
        self.refresh: tuple | None = None  # per head, the window its residual is refreshed for (or None)
        self.keep_residual = False
        self.plain = True  # every head full, nothing to keep or refresh: the model's own processor

    def set(self, methods, keep: bool, refresh, keep_residual: bool) -> None:
        self.methods, self.keep, self.refresh, self.keep_residual = tuple(methods), keep, refresh, keep_residual
        self.plain = not keep and refresh is None and all(m == FULL for m in self.methods)

    def key(self) -> tuple:
        return (self.methods, self.keep, self.refresh, self.keep_residual)


class HeadStepState(FamilyState):
    """What every head of every layer does at the call being run."""

    supports = frozenset({CUDA_GRAPHS})

    def __init__(self, num_layers: int, num_heads: int):
        super().__init__(num_layers)
        self.num_heads = num_heads
        self.text_len: int | None = None  # set by the layers that see the text stream
        self.methods: list[list[HeadMethod]] = [[FULL] * num_heads for _ in range(num_layers)]
        self.keep: list[bool] = [False] * num_layers
        # residual sharing: per layer, the window each full head refreshes its residual for (or
        # None), and whether the layer's residuals are still needed after the call
        self.refresh: list[tuple | None] = [None] * num_layers
        self.keep_residual: list[bool] = [False] * num_layers
        self.layers = [HeadLayerStep(num_heads) for _ in range(num_layers)]  # each processor reads its own
        self._rows: dict[str, list] = {}
        self._shares_cfg = False
        # The search sets this: decide(layer, q, k, v, image_start, image_len, cache, residual) -> (o, residual)
        self.decide: Callable | None = None

    def set_plan(self, plan) -> None:
        super().set_plan(plan)
        self._rows = {"keep": plan.keep_mask(), "refresh": plan.refresh_rows(), "residual": plan.residual_keep_mask()}
        self._shares_cfg = plan.uses_cfg_sharing()

    def on_call(self, call: CallInfo) -> None:
        super().on_call(call)
        if self.plan is None:
            return
        if self._shares_cfg and call.cfg is None:
            raise ValueError("plan.heads uses 'cfg' (CFG sharing) but this transformer call has no CFG batch "
                             "(guidance_scale <= 1, or the branches run as separate calls)")
        s = call.step
        self.methods, self.keep = self.plan.heads[s], self._rows["keep"][s]
        self.refresh, self.keep_residual = self._rows["refresh"][s], self._rows["residual"][s]
        for layer, methods, keep, refresh, keep_residual in zip(self.layers, self.methods, self.keep, self.refresh,
                                                                 self.keep_residual):
            layer.set(methods, keep, refresh, keep_residual)

    def layout(self) -> tuple:
        call = self.call
        return (call.branch, call.cfg, call.grid, tuple(tuple(map(str, layer)) for layer in self.methods),
                tuple(self.keep), tuple(self.refresh))

    def call_reads(self) -> list[tuple[str, ...]] | None:
        """What :class:`HeadwiseJointProcessor` reads: the per-head outputs where a head is cached,
        the residuals where a head shares them, and the residuals again where a refresh writes into them."""
        if self.plan is None or self.decide is not None:
            return None
        reads = []
        for layer in self.layers:
            slots = ()
            if not layer.plain:
                slots = (("head_out",) if any(m.kind == "cache" for m in layer.methods) else ()) \
                    + (("residual",) if _uses_residual(layer.methods) else ()) + (("residual",) if layer.refresh is not None else ())
            reads.append(slots)
        return reads

    def plan_layer_keys(self, step: int) -> list[tuple]:
        """Each layer's :meth:`HeadLayerStep.key` at ``step`` of the plan."""
        rows = self._rows
        held = rows["residual"][step - 1] if step else [False] * self.num_layers  # a residual buffer to refresh into
        return [(tuple(m), k, r, kr) + ((h,) if r is not None else ())
                for m, k, r, kr, h in zip(self.plan.heads[step], rows["keep"][step], rows["refresh"][step],
                                          rows["residual"][step], held)]


def headwise_attention(q, k, v, methods: list[HeadMethod], image_start: int, image_len: int,
                       cache: torch.Tensor | None, cond_half: slice | None = None,
                       update_cache: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Attention outputs [batch, heads, seq, head_dim] with each head's method.

    Full and arrow heads run as one kernel call; cached heads enter it with an empty mask (no
    work) and take their output from ``cache``, the layer's per-head outputs at the previous
    step; ``cfg`` heads attend on the ``cond_half`` of the batch only and copy it to the other half;
    ``arrow+rs`` heads add their ``residual`` (full - arrow at their last full step) to the arrow.
    With ``update_cache`` the computing heads are written into ``cache`` itself, which is
    returned: no copy of the cached heads (the processor owns its cache; the result is this step's).
    """
    cached = [m.kind == "cache" for m in methods]
    shared = [m.kind == "cfg" for m in methods]
    with_residual = [m.shares_residual for m in methods]
    if any(with_residual) and (residual is None or residual.shape != q.shape):
        have = None if residual is None else tuple(residual.shape)
        raise RuntimeError(f"'arrow+rs' heads need the residuals of shape {tuple(q.shape)}, have {have}")
    if any(cached) and (cache is None or cache.shape != q.shape):
        have = None if cache is None else tuple(cache.shape)
        raise RuntimeError(f"cached heads need the previous step's outputs of shape {tuple(q.shape)}, have {have}")
    if any(shared) and cond_half is None:
        raise ValueError("'cfg' heads need a CFG batch (an even batch with a known conditional half)")
    if all(cached):
        return cache
    widths = [SKIP if c or s else m.half_width(image_len) for m, c, s in zip(methods, cached, shared)]
    # (compiled: the arrow is a functional op, and the cached heads are merged by torch.where)
    in_place = update_cache and any(cached) and cache.dtype == q.dtype and not torch.compiler.is_compiling()
    o = arrow_attention(q, k, v, widths, image_start, image_len, out=cache if in_place else None)
    if any(cached) and not in_place:
        keep = device_constant(tuple(cached), q.device)[None, :, None, None]
        o = torch.where(keep, cache.to(o.dtype), o)
    if any(shared):
        sel = device_constant(tuple(h for h, s in enumerate(shared) if s), q.device)
        o_cond = arrow_attention(*(t[cond_half].index_select(1, sel) for t in (q, k, v)),
                                 [image_len] * len(sel), image_start, image_len)
        o.index_copy_(1, sel, torch.cat([o_cond, o_cond]).to(o.dtype))  # the same for both halves
    if any(with_residual):
        sel = device_constant(tuple(h for h, r in enumerate(with_residual) if r), q.device)
        o.index_add_(1, sel, residual.index_select(1, sel).to(o.dtype))
    return o


def arrow_residuals(q, k, v, full: torch.Tensor, windows, image_start: int, image_len: int,
                    into: torch.Tensor | None) -> torch.Tensor:
    """Residual sharing's refresh: for each head with a window in ``windows`` (a fraction, or None
    to keep ``into``'s values), full - arrow at that window, written into ``into`` (zeros if None)."""
    widths = [SKIP if f is None else HeadMethod("arrow", f).half_width(image_len) for f in windows]
    arrow_out = arrow_attention(q, k, v, widths, image_start, image_len)
    into = torch.zeros_like(full) if into is None else into
    sel = device_constant(tuple(h for h, f in enumerate(windows) if f is not None), q.device)
    return into.index_copy_(1, sel, (full.index_select(1, sel) - arrow_out.index_select(1, sel)).to(into.dtype))


class HeadwiseJointProcessor(CachingProcessor):
    """Executes the current call's head methods for one joint-attention layer."""

    # every head's output at the last step; residual sharing's full - arrow per head
    CACHE_SLOTS = ("head_out", "residual")

    def __init__(self, layer: int, state: HeadStepState, inner: Any, io: AttentionIO):
        super().__init__()
        self.layer = layer
        self.state = state
        self.now = state.layers[layer]  # what this layer does at the call being run
        self.wrap(inner)  # the model's own processor, for layers that are entirely full
        self.io = io  # the layer's joint q/k/v and output projections, and where its text sits

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # every argument by its name in the own processor's signature (fastattn.processor_args)
        kwargs = self.args.named(args, kwargs)
        encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        attention_mask = kwargs.pop("attention_mask", None)
        image_rotary_emb = kwargs.pop("image_rotary_emb", None)
        st, l = self.state, self.layer
        if attention_mask is not None:
            raise ValueError(f"layer {l}: head-wise attention does not support an attention_mask")
        if encoder_hidden_states is not None:
            st.text_len = encoder_hidden_states.shape[1]
        if st.seq_len is None:  # the generation's first attention call: its joint sequence (image and text)
            st.record_seq_len((hidden_states.shape[1] + (0 if encoder_hidden_states is None
                                                         else encoder_hidden_states.shape[1]))
                              * sequence_shards(self.inner))
        now = self.now
        if st.decide is None and now.plain:
            extra = {"image_rotary_emb": image_rotary_emb} if image_rotary_emb is not None else {}
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **extra, **kwargs)
        if st.text_len is None:
            raise RuntimeError(f"layer {l}: text length unknown (no earlier layer saw the text stream)")
        q, k, v = self.io.qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        image_start, image_len = self.io.image_span(q.shape[-2], st.text_len)
        methods, refresh, ulysses = now.methods, now.refresh, ulysses_group(self.inner)
        if ulysses is not None:  # whole sequences for this rank's heads, as the unsplit model has them
            if st.decide is not None:
                raise ValueError(f"layer {l}: a head-wise search under context parallelism; search on the unsplit "
                                 "model and apply its plan to the split one")
            (q, order), (k, _), (v, _) = (to_heads(t, ulysses, image_start, image_len) for t in (q, k, v))
            heads = rank_heads(ulysses, len(methods))
            methods = methods[heads]
            if refresh is not None:  # None where none of this rank's heads refreshes
                refresh = refresh[heads] if any(f is not None for f in refresh[heads]) else None
            image_start, image_len = self.io.image_span(q.shape[-2], st.text_len * ulysses.world)
        if st.decide is not None:
            o, self.residual = st.decide(l, q, k, v, image_start, image_len, self.head_out, self.residual)
        else:
            cond = st.call.cond_half(q.shape[0]) if st.call is not None else None
            cached = any(m.kind == "cache" for m in methods)
            o = headwise_attention(q, k, v, methods, image_start, image_len,
                                   self._load(self.head_out) if cached else None, cond, update_cache=True,
                                   residual=self._load(self.residual) if _uses_residual(methods) else None)
            if refresh is not None:  # written into the layer's residual buffer, in place
                self.residual = self._hold(self.residual, arrow_residuals(
                    q, k, v, o, refresh, image_start, image_len, self._load(self.residual)))
            if not now.keep_residual and not st.static_caches:
                self.residual = None
        if now.keep or st.decide is not None:
            self.head_out = self._hold(self.head_out, o)
        elif not st.static_caches:
            self.head_out = None  # no head is cached at the next step
        if ulysses is not None:
            o = to_sequence(o, ulysses, order)
        return self.io.out(attn, o, hidden_states, q.dtype, encoder_hidden_states)


def _uses_residual(methods) -> bool:
    return any(m.shares_residual for m in methods)
