"""The layer-wise (DiTFastAttn) family's processor and the state its processors share.

One :class:`FastAttnProcessor` replaces a self-attention layer's diffusers processor. All
processors of a transformer share a :class:`StepState` that says, for the call being run, each
layer's method, whether a ``full`` step must also refresh the WA-RS residual, and whether the
output must be kept for AST or forecast at the next step (forecast also keeps the computed output
before it: the layer's history of two). ``full`` without a refresh calls the model's own
processor, so an all-full plan is bit-identical to the unmodified model. Steps, CFG branches
and where a CFG batch's conditional half sits come from the counter (:mod:`fastattn.hooks`).
The state holds run-time decisions only, one :class:`LayerStep` per layer; a search sets them
and runs its trials and probes through :mod:`fastattn.search.seam`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention_io import SELF, AttentionIO
from ..context_parallel import ring_group, sequence_shards
from ..core_call import Core, CoreAttention, text_rows
from ..family import BLOCK_CACHES, CUDA_GRAPHS, CachingProcessor, CallInfo, FamilyState
from ..kernels import dense_attention, refresh_attention, tile_attention, window_attention
from ..kernels.masks import tile_radius, window_half_width
from ..kernels.video_masks import check_grid, tile_window_attention
from .methods import FORECAST_AXES, Method, refreshes, refreshing_methods
from .ring import local_attention, ring_full, ring_refresh, ring_window
from .sequences import WHOLE, both_halves, call_spans, each, full_attention, given, half_of, lead, sequence_window

# A captured step must be idempotent (StepGraphs runs it again to capture it); a computed step
# before a forecast moves the layer's last output into its history, which running it twice breaks.
FORECAST_NOT_GRAPHED = ("cuda_graphs: plans with 'forecast' run eagerly (a step that keeps the forecast's history "
                        "moves the layer's last output, so it cannot be replayed from a graph); apply without "
                        "cuda_graphs")


class LayerStep:
    """What one layer does at the call being run, as its processor reads it: plain attributes,
    which a ``torch.compile``'d layer guards on by value, so layers (and steps) making the same
    decision share one compiled graph (no layer index is read in the processor). The state keeps
    a step's decisions here only; its other views (``methods``, ``layout``) are read from these."""

    def __init__(self):
        self.method = Method.FULL
        self.refresh = False  # a full / wars step that also records the WA-RS residual
        self.keep_output = False  # the output is cached for AST at a later step
        self.release_residual = False  # the residual is not read again (freed when eager)
        self.keep_history = False  # the output before this one is kept too (a forecast ahead)

    def set(self, decision: tuple) -> None:
        """Take a decision in :meth:`key`'s order."""
        self.method, self.refresh, self.keep_output, self.release_residual, self.keep_history = decision

    def key(self) -> tuple:
        return (self.method, self.refresh, self.keep_output, self.release_residual, self.keep_history)


def layer_reads(layer: LayerStep) -> tuple[str, ...]:
    """The cache slots a layer's processor reads at the call being run, in its order."""
    if layer.method is Method.AST:
        return ("output_cache",)
    if layer.method is Method.FORECAST:
        return ("output_cache", "previous_output")
    if layer.method.needs_residual and not layer.refresh:
        return ("residual",)
    return ()


def plan_decisions(plan) -> list[list[tuple]]:
    """Every step's layer decisions under ``plan``, in :meth:`LayerStep.key`'s order."""
    refresh, keep = plan.refresh_mask(), plan.output_cache_mask()
    release, history = plan.residual_release_mask(), plan.history_mask()
    return [list(zip(row, refresh[s], keep[s], release[s], history[s])) for s, row in enumerate(plan.methods)]


class StepState(FamilyState):
    """What every layer does at the call being run; shared by a transformer's processors."""

    supports = frozenset({CUDA_GRAPHS, BLOCK_CACHES})

    def __init__(self, num_layers: int, window_size: float = 0.125, window_shape: str = "band",
                 refresh_on: str = "full", forecast_in: str = "timestep"):
        super().__init__(num_layers)
        self.window_size = window_size  # the fraction of the tokens on each side of a query
        self.window_shape = window_shape
        self.refreshing = refreshing_methods(refresh_on)  # the methods whose steps may refresh
        self.layers = [LayerStep() for _ in range(num_layers)]  # the step's decisions; each processor reads its own
        self.forecast_in = check_forecast_axis(forecast_in)
        # A block cache (diffusers' FirstBlockCache, MagCache, PAB, ...; cache-dit's DBCache) sits on
        # the model and may skip a layer's attention call at a step; the handle sets this at each generation. Then
        # every computed call keeps its output (AST reuses the layer's last *computed* output),
        # residuals are kept until the next refresh that runs (WA-RS keeps its last refresh's R),
        # and a WA-RS step whose layer has never refreshed runs as a refresh.
        self.blocks_may_skip = False
        # The seam of a search driving the layers instead of a plan (fastattn/search/seam.py):
        # every layer call goes through it.
        self.search = None
        # Forecast's time axis: each layer's last two computed steps (the same for every CFG
        # branch, so kept here, not among the per-branch caches) and this generation's timesteps.
        self.computed_steps: list[list[int]] = [[] for _ in range(num_layers)]
        self.timesteps: dict[int, float | None] = {}
        self.ran_compiled = False  # a layer ran inside a torch.compile graph this generation
        # Whether the model's joint sequences put the text before the image tokens, and which of a
        # joint sequence's tokens are text (by its length), as the layers given the text separately
        # showed (core_call.text_rows): a layer whose sequence already holds the text (a
        # single-stream layer) has it where they do. None / empty: not seen.
        self.text_first: bool | None = None
        self.text_rows_of: dict[int, torch.Tensor] = {}
        self._plan_steps: list[list[tuple]] = []  # plan_decisions of the plan
        self._shares_cfg = False
        self._windows = False  # the plan has a window method somewhere

    @property
    def window_size(self) -> float:
        return self._window_size

    @window_size.setter
    def window_size(self, value: float) -> None:
        self._window_size = value
        # What the processors hand the kernels' geometry (window_half_width): a compiled layer
        # keeps a string constant, where a float attribute that changed (another plan) would turn
        # symbolic. Its one other form is the kernels' integer half-width.
        self.window_decimal = repr(float(value))

    @property
    def methods(self) -> list[Method]:
        """Each layer's method at the call being run."""
        return [layer.method for layer in self.layers]

    def set_plan(self, plan) -> None:
        if self.static_caches and self.cuda_graphs_refusal(plan):
            raise NotImplementedError(self.cuda_graphs_refusal(plan))
        super().set_plan(plan)
        self.window_size, self.window_shape = plan.window_size, plan.window_shape
        self.refreshing = plan.refreshing_methods
        self.forecast_in = plan.forecast_in
        self._plan_steps = plan_decisions(plan)
        # Under a block cache a layer's computed steps are not the plan's: a layer that forecasts
        # anywhere keeps its previous output at every computed step.
        self._forecasting = [any(row[l] is Method.FORECAST for row in plan.methods) for l in range(plan.num_layers)]
        self._shares_cfg = plan.uses_cfg_sharing()
        self._windows = any(m.uses_window for row in plan.methods for m in row)

    def reset(self) -> None:
        super().reset()
        self.computed_steps = [[] for _ in range(self.num_layers)]
        self.timesteps = {}
        self.ran_compiled = False

    @property
    def needs_text_layout(self) -> bool:
        """A window may run on a layer whose sequence holds text before a layer given the text
        separately has shown where the text goes (:attr:`text_first`)."""
        return self._windows and self.text_first is None

    def on_call(self, call: CallInfo) -> None:
        super().on_call(call)
        self.timesteps[call.step] = call.timestep
        if self.plan is None:  # a search sets the decisions itself
            return
        if self._shares_cfg and call.cfg is None:
            raise ValueError("plan uses 'asc' or 'wars+asc' but this transformer call has no CFG batch "
                             "(guidance_scale <= 1, or the branches run as separate calls); "
                             "search a plan without them for this setting")
        row = self._plan_steps[call.step]
        if self.blocks_may_skip:
            row = [(m, refresh, True, False, history)
                   for (m, refresh, _, _, _), history in zip(row, self._forecasting, strict=True)]
        for layer, decision in zip(self.layers, row, strict=True):
            layer.set(decision)

    def set_step(self, methods, residual_read_later, keep_output, release_residual=None, keep_history=None) -> None:
        """Set every layer's decision; a layer refreshes where :func:`refreshes` says."""
        n = len(methods)
        release_residual = release_residual if release_residual is not None else [False] * n
        keep_history = keep_history if keep_history is not None else [False] * n
        for layer, method, read_later, keep, release, history in zip(
                self.layers, methods, residual_read_later, keep_output, release_residual, keep_history, strict=True):
            layer.set((method, refreshes(method, self.refreshing, read_later), keep, release, history))

    def note_computed(self, layer: int) -> None:
        """The layer's output of the call being run was computed and written to its caches."""
        steps, step = self.computed_steps[layer], self.step
        if not steps or steps[-1] != step:  # a later CFG branch of the same step counts once
            steps.append(step)
            del steps[:-2]

    def forecast_weight(self, layer: int) -> float:
        """w in O_k = O_b + w (O_b - O_a): (t_k - t_b) / (t_b - t_a) for the layer's last two
        computed steps a < b and the step k being run, on the ``forecast_in`` axis."""
        steps, k = self.computed_steps[layer], self.step
        if len(steps) < 2:
            if self.ran_compiled:  # the processors do not record computed steps in a graph
                raise RuntimeError("'forecast' plans run eagerly: a compiled transformer does not track the "
                                   "layers' computed steps; apply the plan to the transformer uncompiled")
            raise RuntimeError(f"layer {layer}, step {k}: 'forecast' needs two computed outputs, the layer has "
                               f"{len(steps)}")
        a, b = steps
        if self.forecast_in == "step":
            return (k - b) / (b - a)
        ta, tb, tk = (self.timesteps.get(s) for s in (a, b, k))
        if ta is None or tb is None or tk is None:
            raise ValueError(f"layer {layer}, step {k}: forecast_in='timestep' needs the calls' timestep values, "
                             "and a call had none; use forecast_in='step'")
        if ta == tb:
            raise ValueError(f"layer {layer}, step {k}: steps {a} and {b} have the same timestep {ta}; "
                             "forecast_in='timestep' cannot extrapolate, use forecast_in='step'")
        return (tk - tb) / (tb - ta)

    def cuda_graphs_refusal(self, plan=None) -> str | None:
        plan = plan if plan is not None else self.plan
        if plan is not None and plan.counts()[Method.FORECAST.value]:
            return FORECAST_NOT_GRAPHED
        return None

    def layout(self) -> tuple:
        call = self.call
        return (call.branch, call.cfg, call.grid, tuple((l.method, l.refresh, l.keep_output) for l in self.layers))

    def call_reads(self) -> list[tuple[str, ...]] | None:
        """What :class:`FastAttnProcessor` reads: AST its output cache, forecast that and the output
        before it, WA-RS without a refresh its residual."""
        if self.plan is None or self.search is not None:
            return None
        return [layer_reads(layer) for layer in self.layers]

    def plan_layer_keys(self, step: int) -> list[tuple]:
        """Each layer's :meth:`LayerStep.key` at ``step`` of the plan."""
        return list(self._plan_steps[step])


def check_forecast_axis(axis: str) -> str:
    if axis not in FORECAST_AXES:
        raise ValueError(f"forecast_in must be one of {', '.join(FORECAST_AXES)}, got {axis!r}")
    return axis


class FastAttnProcessor(CachingProcessor):
    """Executes the current call's method for one self-attention layer."""

    # AST: output of the last computed step; forecast: that and the computed output before it;
    # WA-RS: R = O - W from the refresh step
    CACHE_SLOTS = ("output_cache", "previous_output", "residual")

    def __init__(self, layer: int, state: StepState, inner: Any, io: AttentionIO = SELF, geometry: str = "spatial",
                 windows: bool = True):
        super().__init__()
        self.layer = layer
        self.state = state
        self.now = state.layers[layer]  # what this layer does at the call being run
        self.wrap(inner)  # the model's own processor, used for plain full attention
        self.io = io  # the layer's q/k/v and output projections
        self.geometry = geometry  # 'full3d': the tile window is a 3-D neighbourhood over the token grid
        self.windows = windows  # False: its attention is no SDPA call (linear attention), so no window method
        self.executed: tuple[Method, bool] | None = None  # (method, refreshed) of the last call: FLOPs counters read it
        # the text rows of the layer's attention calls, per (input, text) shape (found once each),
        # and the layouts worked out from them per call shape
        self.text_layouts: dict[tuple, list | None] = {}
        self.call_layouts: dict[tuple, Any] = {}

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # Reads only its own LayerStep and the shared state (no per-step Python control outside
        # them), so under torch.compile it traces without a graph break; see fastattn.compile.
        # Every argument goes by its name in the own processor's signature (FLUX's positional
        # image_rotary_emb, Wan's rotary_emb), never into another's place.
        kwargs = self.args.named(args, kwargs)
        encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        attention_mask = kwargs.pop("attention_mask", None)
        temb = kwargs.pop("temb", None)
        st = self.state
        if st.seq_len is None:  # the generation's first attention call: the whole sequence's count
            st.record_seq_len(hidden_states.shape[1] * sequence_shards(self.inner))
        if st.search is not None:  # a search decides this call (fastattn/search/seam.py)
            return st.search.layer_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        return self.run(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)

    def run(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs) -> torch.Tensor:
        """The layer's decision for the call: its output, and its caches written as the step says."""
        method = self.resolved_method()
        refresh = method.computes and self.windows and self._refreshes_now(method)  # no residual without a window
        self.executed = (method, refresh)
        out = self.output(method, refresh, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if method.computes:
            self._keep_computed(out)
        elif not self.now.keep_output and not self.state.static_caches:
            self.output_cache = self.previous_output = None  # the last reuse of a run: free the caches
        return out

    def resolved_method(self) -> Method:
        """The step's method, or AST where it forecasts and a block cache skipped the layer's other
        computed step (reuse the one there is)."""
        st, method = self.state, self.now.method
        if method is Method.FORECAST and st.blocks_may_skip and len(st.computed_steps[self.layer]) < 2:
            return Method.AST
        return method

    def _refreshes_now(self, method: Method) -> bool:
        """The step's refresh, or a refresh where a block cache skipped the refresh step of a WA-RS
        layer and no earlier one ran."""
        if method.needs_residual and self.residual is None and self.state.blocks_may_skip:
            return True
        return self.now.refresh

    def output(self, method: Method, refresh: bool, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
               kwargs) -> torch.Tensor:
        """The layer's output under ``method``; of the caches it writes only the residual, where ``refresh``."""
        if not method.computes:  # AST or forecast
            return self.reused_output(method, hidden_states.shape)
        if method is Method.FULL and not refresh:
            if encoder_hidden_states is not None and self.io.wraps_inner and self.state.needs_text_layout \
                    and not torch.compiler.is_compiling():
                # a full joint layer shows the single-stream layers where the text goes (once)
                named = {**kwargs, **given(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                                           temb=temb)}
                with local_attention(self.inner):
                    self._text_rows(attn, hidden_states, named)
            return self.own_output(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if self.io.wraps_inner:
            return self._through_inner(attn, hidden_states, method, refresh,
                                       {**kwargs, **given(encoder_hidden_states=encoder_hidden_states,
                                                           attention_mask=attention_mask, temb=temb)})
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(f"layer {self.layer}: {method.value!r} supports unmasked self-attention on "
                             "[batch, tokens, dim] inputs only")
        return self._compressed(attn, hidden_states, method, refresh, self._rotary(kwargs))

    def own_output(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs) -> torch.Tensor:
        """Full attention through the model's own processor."""
        # only those given: a processor may not name them (ERNIE-Image's takes no encoder states)
        named = given(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb)
        return self.inner(attn, hidden_states, **named, **kwargs)

    def _keep_computed(self, out: torch.Tensor) -> None:
        """Record a computed output: the layer's computed steps, its output and history caches as
        the step keeps them, and the residual freed after its last use."""
        st, now = self.state, self.now
        if torch.compiler.is_compiling():  # (set when the graph runs) forecast's time axis is not tracked
            st.ran_compiled = True
        else:
            st.note_computed(self.layer)
        if now.keep_history:  # a forecast ahead reads this output and the one before it
            self.previous_output = self.output_cache  # moved, not copied: forecast plans run without graphs
        elif not st.static_caches:
            self.previous_output = None
        if now.keep_output:
            self.output_cache = self._hold(self.output_cache, out)
        elif not st.static_caches:
            self.output_cache = None
        if now.release_residual and not st.static_caches:
            self.residual = None

    def reused_output(self, method: Method, shape) -> torch.Tensor:
        """AST's or forecast's output from the caches; they hold what the plan's masks said to keep."""
        st, l = self.state, self.layer
        if self.output_cache is None:
            raise RuntimeError(f"layer {l}, step {st.step}: {method.value!r} has no cached output from an earlier step")
        if lead(self.output_cache).shape[:2] != shape[:2]:
            raise RuntimeError(f"layer {l}, step {st.step}: {method.value!r} cache has shape "
                               f"{tuple(lead(self.output_cache).shape)}, input has {tuple(shape)}; the batch changed "
                               "mid-generation")
        if method is Method.AST:
            return self._load(self.output_cache)
        if self.previous_output is None:
            raise RuntimeError(f"layer {l}, step {st.step}: 'forecast' has no second computed output to extrapolate from")
        latest, weight = self._load(self.output_cache), st.forecast_weight(l)
        return each(lambda now, before: now + weight * (now - before), latest, self._load(self.previous_output))

    def _rotary(self, kwargs: dict):
        """The call's rotary embedding, where the layer's projections take one (Wan's ``rotary_emb``)."""
        return kwargs.get(self.io.rotary_arg) if self.io.rotary_arg else None

    def _cond_half(self, method: Method, batch: int) -> slice | None:
        """ASC's conditional half of the call's batch; None for the methods that use the whole batch."""
        if not method.shares_cfg:
            return None
        half = self.state.call.cond_half(batch) if self.state.call is not None else None
        if half is None:
            raise ValueError(f"layer {self.layer}: {method.value!r} needs a CFG batch, and this call has none")
        return half

    def _compressed(self, attn, x: torch.Tensor, method: Method, refresh: bool, rotary=None) -> torch.Tensor:
        batch = x.shape[0]
        half = self._cond_half(method, batch)
        x = x if half is None else x[half]
        q, k, v = self.io.qkv(attn, x, None, rotary)
        o = self._attend(Core(q, k, v, None), method, refresh, half, batch)
        out = self.io.out(attn, o, x, q.dtype)
        # ASC: the conditional half's output serves both halves (one write of the layer output).
        return out.repeat(2, 1, 1) if half is not None else out

    def _through_inner(self, attn, x: torch.Tensor, method: Method, refresh: bool, named: dict):
        """The method on a layer whose projections are its own processor's (a wrapping io): that
        processor runs with its attention core replaced (:mod:`fastattn.core_call`); for ASC on
        the conditional half of every batch-sized argument. Where the layer's sequence holds text,
        the window covers its image tokens (:meth:`_spans`)."""
        batch = x.shape[0]
        half = self._cond_half(method, batch)
        if half is not None:
            x, named = x[half], {name: half_of(value, half, batch) for name, value in named.items()}
        if refresh or method.uses_window:
            # under diffusers' ring the calls see the rank's own tokens and fastattn's ring answers them
            ring = ring_group(self.inner)
            with local_attention(self.inner):
                text, written = self._text_rows(attn, x, named), []

                def attend(core: Core, index: int) -> torch.Tensor:
                    spans = self._spans(core, x.shape[1], text[index] if text is not None and index < len(text)
                                        else None, ring)
                    if spans is WHOLE:  # the arrow keeps the call whole (W = O): no residual
                        if refresh:
                            written.append(core.q.new_zeros(0))
                        return full_attention(core) if ring is None else ring_full(core, ring)
                    return self._attend(core, method, refresh, half, batch, spans, index, written, ring)

                with CoreAttention(attend, self.layer):
                    out = self.inner(attn, x, **named)
            if refresh:  # one residual per attention call (most processors make one)
                residual = written[0] if len(written) == 1 else tuple(written)
                if half is not None:  # an asc refresh: the conditional half's residual serves both halves
                    residual = both_halves(residual)
                self.residual = self._hold(self.residual, residual)
        else:  # asc: the own processor, whatever its attention, on the conditional half
            out = self.inner(attn, x, **named)
        return each(lambda o: torch.cat([o, o]), out) if half is not None else out

    def _text_rows(self, attn, x: torch.Tensor, named: dict) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Which query and key tokens of each of the layer's attention calls are the text given to
        it (None without text), found once per shape (:func:`fastattn.core_call.text_rows`)."""
        text = named.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor):
            return None
        key = (tuple(x.shape), tuple(text.shape))
        if key not in self.text_layouts:
            if text is x or (text.shape == x.shape and torch.equal(text, x)):
                rows = None  # its own tokens passed as the "text" (Lumina's attn1): plain self-attention
            else:
                rows = text_rows(lambda nan: self.inner(attn, x, **{**named, "encoder_hidden_states": nan}),
                                 text, self.layer)
                if self.state.text_first is None:
                    self.state.text_first = bool(rows[0][1][0])
                for q_rows, k_rows in rows:
                    if q_rows.numel() == k_rows.numel() and bool((q_rows == k_rows).all()):
                        self.state.text_rows_of.setdefault(q_rows.numel(), q_rows)
            self.text_layouts[key] = rows
        return self.text_layouts[key]

    def _spans(self, core: Core, layer_tokens: int, rows, ring=None):
        call = self.state.call
        st = self.state
        if rows is None and core.q.shape[-2] == core.k.shape[-2] in st.text_rows_of:
            known = st.text_rows_of[core.q.shape[-2]]  # a single-stream layer: the joint layers' layout
            rows = (known, known)
        image = call.image_tokens if call is not None else None
        if image is not None and ring is not None:
            image //= ring.world  # the rank's shard of the model input's image tokens
        # the same call shapes give the same layout: worked out once (no per-call host work)
        key = (id(rows[0]) if rows is not None else None, core.q.shape[-2], core.k.shape[-2], layer_tokens, image,
               st.text_first)
        if key not in self.call_layouts:
            self.call_layouts[key] = call_spans(core, layer_tokens, rows, image, st.text_first, self.layer)
        return self.call_layouts[key]

    def _attend(self, core: Core, method: Method, refresh: bool, half: slice | None, batch: int,
                spans=None, index: int = 0, written: list | None = None, ring=None) -> torch.Tensor:
        """The method's attention on a :class:`Core` call; writes the residual where ``refresh``
        (into ``written``, the call's list, where given). ``spans``: the image tokens among the
        queries and the keys where the call also holds text (the window covers them, :meth:`_spans`);
        ``index``: the sample of a per-sample call; ``ring``: the call holds the rank's shard of a
        ring-parallel sequence (:mod:`.ring`)."""
        q, k, v = core.q, core.k, core.v
        plain = core.mask is None and spans is None and not core.causal and ring is None
        if refresh:
            o, residual = self.refresh(q, k, v) if plain else self._sequence_refresh(core, spans, ring)
            if written is not None:
                written.append(residual)
                return o
            if half is not None:  # an asc refresh: the conditional half's residual serves both halves
                residual = residual.repeat(2, 1, 1, 1)
            self.residual = self._hold(self.residual, residual)
            return o
        if method is Method.WA:  # the ablation: the window alone, nothing added back
            return self.window(q, k, v) if plain else self._sequence_window(core, spans, ring)
        if method.needs_residual:
            residual = self._call_residual(index, half, batch)
            return self.window(q, k, v, residual) if plain else self._sequence_window(core, spans, ring) + residual
        # asc: full attention on the conditional half
        return full_attention(core) if ring is None else ring_full(core, ring)

    def _call_residual(self, index: int, half: slice | None, batch: int) -> torch.Tensor:
        """The residual of the layer's attention call ``index`` (its refresh's call of the same
        index; under ASC a per-sample processor's calls are the conditional samples')."""
        stored = self.residual
        if isinstance(stored, tuple):
            if all(r.shape[0] == 1 for r in stored if r.numel()):  # one per sample (or a batch of one)
                return self._load(stored[index + (half.start if half is not None else 0)])
            residual = self._load(stored[index])
        else:
            if stored is None or stored.shape[0] != batch:
                raise RuntimeError(f"layer {self.layer}, step {self.state.step}: WA-RS has no residual for batch "
                                   f"{batch} (its refresh step did not run with this batch)")
            residual = self._load(stored)
        return residual if half is None else residual[half]

    def _sequence_window(self, core: Core, spans, ring=None) -> torch.Tensor:
        st = self.state
        if ring is None:
            return sequence_window(core, spans, st.window_shape, st.window_decimal, self.layer)
        return ring_window(core, spans, st.window_decimal, ring, self.layer, self._ring_grid())

    def _sequence_refresh(self, core: Core, spans, ring=None) -> tuple[torch.Tensor, torch.Tensor]:
        if ring is not None:
            return ring_refresh(core, spans, self.state.window_decimal, ring, self.layer, self._ring_grid())
        o = full_attention(core)
        return o, o - self._sequence_window(core, spans)

    def _ring_grid(self):
        """None for the band; the call's token grid for a video layer's tile window under a ring."""
        st = self.state
        if st.window_shape == "band":
            return None
        if self.geometry != "full3d":
            raise ValueError(f"layer {self.layer}: the {st.window_shape!r} window under ring context parallelism "
                             "serves video layers (a 3-D token grid); use window_shape='band' here")
        grid = st.call.grid if st.call is not None else None
        if grid is None:
            raise ValueError(f"layer {self.layer}: the tile window needs the latent grid, and the adapter read none")
        return grid

    def window(self, q, k, v, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Window attention W, plus ``residual`` when given (WA-RS)."""
        st = self.state
        seq_len = q.shape[-2]
        if st.window_shape == "band":
            return window_attention(q, k, v, window_half_width(seq_len, st.window_decimal), residual)
        grid = st.call.grid if st.call is not None else None
        if grid is None:
            raise ValueError(f"layer {self.layer}: the tile window needs the latent grid, and the adapter read none")
        if self.geometry == "full3d":
            out = tile_window_attention(q, k, v, check_grid(grid, seq_len), st.window_size)
            return out if residual is None else out + residual
        grid_width = grid[-1]
        if seq_len % grid_width:
            raise ValueError(f"layer {self.layer}: {seq_len} tokens do not form a grid of width {grid_width}")
        return tile_attention(q, k, v, tile_radius(seq_len, st.window_decimal), grid_width, residual)

    def refresh(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """The WA-RS refresh: full attention O and the residual R = O - W."""
        if self.state.window_shape == "band":
            return refresh_attention(q, k, v, window_half_width(q.shape[-2], self.state.window_decimal))
        o = dense_attention(q, k, v)
        return o, o - self.window(q, k, v)
