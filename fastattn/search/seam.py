"""The one seam through which the layer-wise searches drive the family.

A search decides a step by running the transformer several times: trials (some layers
compressed, nothing written), probes (every layer full, each candidate's output measured inside
the layer, nothing written) and a commit (the decided methods, writing the caches later steps
read). The run-time state (:class:`~fastattn.layerwise.processor.StepState`) holds only a step's decisions;
what only a search needs (whether a call writes, the probe, the rollback) lives here. While a
seam is attached, every layer call goes through :meth:`LayerwiseSearchSeam.layer_call`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch

from ..kernels.masks import window_half_width
from ..layerwise.methods import Method, refreshing_methods
from ..layerwise.plan import check_window_shape
from ..layerwise.processor import check_forecast_axis
from ..layerwise.sequences import lead
from .common import run_calibration

# A probe's recorder: (layer, its full output, {candidate: its output}) for the candidates the
# layer's caches (and the call's CFG batch) let run.
Probe = Callable[[int, torch.Tensor, dict], None]


class LayerwiseSearchSeam:
    """Sets a step's decisions for a trial or a commit, probes the layers' candidates, and parks
    and restores every cache for a rollback, on one handle's layer-wise state and processors."""

    def __init__(self, state, processors: list):
        self.state, self.processors = state, processors
        self.writes = True  # the call commits: its caches are written as the step says
        self._probe: tuple[tuple[Method, ...], Probe] | None = None
        state.search = self

    # -- setting a step's decisions -----------------------------------------------------------
    def trial(self, methods: list[Method]) -> None:
        """The next calls run ``methods`` from the caches as they are, writing nothing."""
        n = len(methods)
        self.state.set_step(methods, [False] * n, [False] * n)
        self.writes = False

    def commit(self, methods: list[Method], keep_history: bool = False, writes: bool = True) -> None:
        """The next calls run ``methods`` and write what any later step may read: every layer
        that may refresh does, every layer keeps its output (and with ``keep_history`` the one
        before it). ``writes=False``: a step a block cache will skip runs (the trajectory needs
        an output) but writes no cache and counts as no computed step."""
        n = len(methods)
        self.state.set_step(methods, [writes] * n, [True] * n, keep_history=[keep_history] * n)
        self.writes = writes

    @contextmanager
    def probing(self, methods: Iterable[Method], record: Probe):
        """Within: every layer runs full attention, hands ``record`` each of ``methods`` it can
        run from its caches, and writes nothing."""
        self.trial([Method.FULL] * self.state.num_layers)
        self._probe = (tuple(methods), record)
        try:
            yield
        finally:
            self._probe = None

    # -- reading the layers -------------------------------------------------------------------
    def computed_outputs(self, layer: int) -> int:
        """How many computed outputs the layer holds for AST (one) and forecast (two)."""
        return len(self.state.computed_steps[layer])

    def can_run(self, processor, method: Method, shape) -> bool:
        """Whether the layer's caches (and the call's CFG batch) let ``method`` run at the call."""
        st = self.state
        if method.uses_window and not processor.windows:
            return False
        if not method.computes:
            cache = processor.output_cache
            ready = cache is not None and lead(cache).shape[:2] == shape[:2]
            return ready and (method is Method.AST or (processor.previous_output is not None
                                                       and len(st.computed_steps[processor.layer]) >= 2))
        residual = processor.residual
        # a tuple: one residual per attention call of the layer (its processor's sample or segment calls)
        if method.needs_residual and (residual is None or not isinstance(residual, tuple)
                                      and residual.shape[0] != shape[0]):
            return False
        return not method.shares_cfg or (st.call is not None and st.call.cfg is not None)

    # -- rollback -----------------------------------------------------------------------------
    def park(self):
        """Every layer's caches and computed steps, for :meth:`restore`."""
        return [p.park() for p in self.processors], [list(s) for s in self.state.computed_steps]

    def restore(self, parked) -> None:
        caches, computed = parked
        for p, slots in zip(self.processors, caches, strict=True):
            p.restore(slots)
        self.state.computed_steps = [list(s) for s in computed]

    # -- the layers' calls --------------------------------------------------------------------
    def layer_call(self, processor, attn, x, encoder_hidden_states, attention_mask, temb, kwargs) -> torch.Tensor:
        """One layer's call while the search drives: a probe, a trial, or the run-time path."""
        if self._probe is not None:
            return self._probe_layer(processor, attn, x, encoder_hidden_states, attention_mask, temb, kwargs)
        if self.writes:
            return processor.run(attn, x, encoder_hidden_states, attention_mask, temb, kwargs)
        method = processor.resolved_method()
        processor.executed = (method, False)
        return processor.output(method, False, attn, x, encoder_hidden_states, attention_mask, temb, kwargs)

    def _probe_layer(self, processor, attn, x, encoder_hidden_states, attention_mask, temb, kwargs) -> torch.Tensor:
        methods, record = self._probe
        out = processor.own_output(attn, x, encoder_hidden_states, attention_mask, temb, kwargs)
        plain = processor.io.wraps_inner or (encoder_hidden_states is None and attention_mask is None and x.ndim == 3)
        outputs = {m: processor.output(m, False, attn, x, encoder_hidden_states, attention_mask, temb, kwargs)
                   for m in methods if plain and self.can_run(processor, m, x.shape)}
        record(processor.layer, _flat(out), {m: _flat(o) for m, o in outputs.items()})
        return out

    def detach(self) -> None:
        """The layers run the state's decisions again."""
        self.state.search = None


def _flat(output) -> torch.Tensor:
    """A layer output as one tensor to measure: a joint layer's (image, text) streams side by side."""
    if isinstance(output, tuple):
        return torch.cat([stream.flatten(1) for stream in output], dim=1)
    return output


def check_layerwise_settings(window_size: float, window_shape: str, refresh_on: str, forecast_in: str) -> None:
    """One-line errors for a layer-wise search's family settings, before anything is installed."""
    window_half_width(1, window_size)  # the range, with a named error
    check_window_shape(window_shape)
    refreshing_methods(refresh_on)  # the rule
    check_forecast_axis(forecast_in)


def run_search(pipe, calibration_inputs: dict, handle, search):
    """One calibration generation with ``search`` standing in for the transformer's forward at
    every call; (its cost, the CFG layout seen). The search decided every step, or this raises."""
    handle.on_generation = search.start
    handle.intercept = search
    cost, cfg = run_calibration(pipe, calibration_inputs, handle, close=search.close, blocks=search.replay)
    if search.num_steps is not None and len(search.rows) != search.num_steps:
        raise RuntimeError(f"search saw {len(search.rows)} transformer calls for {search.num_steps} scheduler steps")
    return cost, cfg
