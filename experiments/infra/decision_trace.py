"""What ran at each transformer call of one generation: a row's decision trace, for replaying the
row's decisions on other (full-size) architectures.

A :class:`DecisionTrace` installed on a transformer records the first generation it sees, one entry
per transformer call, and nothing after it (:attr:`~DecisionTrace.done`): the generation ends at
:meth:`~DecisionTrace.finish` (the caller knows where a pipeline call ends: :meth:`~DecisionTrace.generation`
around it), or where :class:`~fastattn.features.steps.StepCounter` sees a call fall back to step 0's
timestep (a second generation begun without ``finish``). The record (:meth:`~DecisionTrace.to_dict`)::

    {"format": 1, "num_blocks": B, "num_attention_layers": L,
     "window_size": 0.125 | null, "window_shape": "band" | null,  # the fastattn plan's, if one runs
     "cfg": "cond_first" | "uncond_first" | null,                 # the adapter's layout of the first call
     "calls": [{"step": s, "branch": b,   # StepCounter's: b > 0 for a separate CFG pass of step s
                "rows": r,                # the batch rows the blocks ran at (0: no block ran)
                "call_rows": n,           # the call's batch (FasterCache runs the blocks on half of it)
                "blocks": [bool] * B,     # some nn.Linear inside the block ran
                "attention": [str] * L,   # a fastattn Method value ("full", "wars", "ast", ...) where a
                                          # fastattn processor ran; "full" where the layer ran without
                                          # one; "skipped" where its output was not computed
                "refresh": [bool] * L}, ...]}  # a WA-RS refresh (fastattn's), else false

Blocks and layers are the adapter's (``blocks``, ``attention_layers``). What ran is read from the
``nn.Linear`` layers run inside the blocks (:class:`~.block_flops.BlockLinearHooks`, as the FLOP
counter reads them), not from the blocks' or layers' own calls: diffusers' cache hooks replace a
module's ``forward``, so a block or an attention layer is called even where it returns a cached or
predicted output. Everything recorded is host data: shapes, Python
state; the step counter's one timestep read per call is StepCounter's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn

from fastattn import get_handle
from fastattn.features.steps import StepCounter
from fastattn.models import get_adapter
from fastattn.models.adapters.base import latents_of

from .block_flops import BlockLinearHooks

FORMAT = 1


class DecisionTrace:
    """Records the first generation from installation (see the module); hooks off at :meth:`finish`
    or :meth:`remove`."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.adapter = get_adapter(transformer)
        self.counter = StepCounter(self.adapter.timestep_arg)
        blocks = self.adapter.blocks(transformer)
        self.layers = self.adapter.attention_layers(transformer)
        self.record = {"format": FORMAT, "num_blocks": len(blocks), "num_attention_layers": len(self.layers),
                       "window_size": None, "window_shape": None, "cfg": None, "calls": []}
        self._done = False
        self._call: dict | None = None  # the entry of the call being run
        self._layer_ran: list[bool] = []  # per layer, whether a linear inside it ran in this call
        self._executed_before: list = []  # per layer, its processor's ``executed`` when the call began
        self._layer_of = {id(m): i for i, layer in enumerate(self.layers) for m in layer.modules()
                          if isinstance(m, nn.Linear)}
        self._hooks: list = [transformer.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                             transformer.register_forward_hook(self._end_call)]
        self._linears = BlockLinearHooks(transformer, self._linear_ran)

    @property
    def done(self) -> bool:
        """One generation recorded: nothing more will be."""
        return self._done

    @property
    def calls(self) -> list[dict]:
        return self.record["calls"]

    def to_dict(self) -> dict:
        return dict(self.record)

    # -- per call ---------------------------------------------------------------------------
    def _begin_call(self, module, args, kwargs):
        if self._done:
            return
        timestep = self.counter.timestep_key(module, args, kwargs)
        if self.counter.restarts(timestep):  # a second generation begun without finish()
            self.finish()
            return
        step, branch = self.counter.advance(timestep)
        if not self.calls:  # the generation's first call: its CFG layout, the plan that runs
            self.record["cfg"] = self.adapter.cfg_layout(module, args, kwargs)
            plan = getattr(get_handle(self.transformer), "plan", None)
            self.record["window_size"] = getattr(plan, "window_size", None)
            self.record["window_shape"] = getattr(plan, "window_shape", None)
        latents = latents_of(args, kwargs)
        self._call = {"step": step, "branch": branch, "rows": 0,
                      "call_rows": int(latents.shape[0]) if latents is not None and latents.ndim else None,
                      "blocks": [False] * self.record["num_blocks"]}
        self._layer_ran = [False] * len(self.layers)
        # a fastattn processor sets a new ``executed`` tuple each time it runs: one still the same
        # object at the call's end did not run in it (kept by reference, so no new one can reuse its id)
        self._executed_before = [self._executed(layer) for layer in self.layers]

    def _end_call(self, module, args, output):
        call, self._call = self._call, None
        if call is None:
            return
        call["attention"], call["refresh"] = [], []
        for layer, ran, before in zip(self.layers, self._layer_ran, self._executed_before, strict=True):
            executed = self._executed(layer)
            if executed is not None and executed is not before:
                method, refresh = executed[0].value, bool(executed[1])
            else:
                method, refresh = ("full" if ran else "skipped"), False
            call["attention"].append(method)
            call["refresh"].append(refresh)
        self.calls.append(call)

    @staticmethod
    def _executed(layer: nn.Module):
        """(Method, refreshed) of the last call of a fastattn processor on ``layer``; None without one."""
        return getattr(getattr(layer, "processor", None), "executed", None)

    def _linear_ran(self, block: int, module: nn.Linear, args) -> None:
        call = self._call
        if call is None:
            return
        call["blocks"][block] = True
        layer = self._layer_of.get(id(module))
        if layer is not None:
            self._layer_ran[layer] = True
        x = args[0] if args else None
        if x is not None and x.ndim >= 3:  # token inputs (batch, tokens, dim): not flattened ones
            call["rows"] = max(call["rows"], int(x.shape[0]))

    # -- generations ------------------------------------------------------------------------
    @contextmanager
    def generation(self, inner: Callable[[], AbstractContextManager] | None = None) -> Iterator[None]:
        """Around one pipeline call (``generate``'s ``call_context``): ``inner()`` (a cache's own
        context) inside, and the recording finished after the call."""
        with inner() if inner is not None else nullcontext():
            yield
        self.finish()

    def finish(self) -> None:
        """End the recording (the generation is over); the hooks come off."""
        self._done = True
        self._call = None
        self.remove()

    def remove(self) -> None:
        self._linears.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


__all__ = ["FORMAT", "DecisionTrace"]
