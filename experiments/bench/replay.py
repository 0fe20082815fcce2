"""A compare_caches row's decisions (its trace, ``samples/<row>/trace.json``) replayed on another
transformer, so that its loop can be timed on a full-size architecture.

The trace says, per transformer call of the built-in model, which blocks ran and what each
attention layer did. Replayed with fastattn's own machinery:

- attention: a :class:`~fastattn.layerwise.plan.LayerPlan` over the real model's layers, each
  taking the traced layer at its depth (real j of L_r takes traced floor(j L_t / L_r)); "skipped"
  (a peer returned a cached or predicted output, or its block was skipped) becomes AST, which costs
  what a reuse costs; where the pipeline has no CFG batch, CFG-sharing methods become their
  unshared kin (:data:`~.zoo_shapes.NO_CFG`). A cell the mapped column cannot run as written (AST
  with nothing computed before it, after a timed-steps subset) takes what fastattn itself runs
  there under a block cache (:func:`runnable`).
- blocks: a diffusers hook per real block that some call skips (:class:`ReplayBlock`): at a call
  where its block does not run it returns the block's input plus the residual cached at the
  block's last run. Where a traced call's skipped blocks are one contiguous range (the first a and
  last b blocks run, as FirstBlockCache, cache-dit's FnBm and MagCache do) the real model runs its
  own first a and last b blocks; otherwise blocks map by depth (:func:`running_blocks`).
  The step and branch come from the fastattn handle's counter.
- a call whose blocks ran on the conditional half only (``0 < rows < call_rows``: FasterCache's
  unconditional skip): where the pipeline runs CFG as two calls the unconditional call is not
  made; without CFG nothing changes; on a CFG batch the row is refused (:class:`Unreplayable`):
  its half-batch calls would change the batch under fastattn's caches mid-generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry

from fastattn import apply_fastattn, remove_fastattn
from fastattn.layerwise.methods import Method, refreshing_methods
from fastattn.layerwise.plan import LayerPlan
from fastattn.models import get_adapter

from .zoo_shapes import CFG_BATCH, CFG_CALLS, NO_CFG, step_inputs

TRACE_FORMAT = 1
SKIPPED = "skipped"
HOOK_NAME = "fastattn_replay_block"
DEFAULT_WINDOW = 0.125


class Unreplayable(ValueError):
    """A row whose decisions this replay cannot reproduce on the model (one line, naming it)."""


def load_trace(path: str | Path) -> dict:
    """A trace file, checked for what the replay reads."""
    trace = json.loads(Path(path).read_text())
    if trace.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: trace format {trace.get('format')!r}, this replay reads {TRACE_FORMAT}")
    calls = trace.get("calls") or []
    if not calls:
        raise ValueError(f"{path}: the trace has no calls")
    blocks, layers = trace["num_blocks"], trace["num_attention_layers"]
    for c in calls:
        if len(c["blocks"]) != blocks or len(c["attention"]) != layers:
            raise ValueError(f"{path}: step {c['step']} branch {c['branch']} does not have {blocks} blocks and "
                             f"{layers} attention layers")
    if sorted({c["step"] for c in calls}) != list(range(trace_steps(trace))):
        raise ValueError(f"{path}: the trace's steps are not 0..n-1")
    return trace


def trace_steps(trace: dict) -> int:
    return 1 + max(c["step"] for c in trace["calls"])


def calls_by_step(trace: dict) -> dict[int, list[dict]]:
    """Each step's traced calls, by branch."""
    steps: dict[int, list[dict]] = {}
    for c in sorted(trace["calls"], key=lambda c: (c["step"], c["branch"])):
        steps.setdefault(c["step"], []).append(c)
    return steps


def depth_map(real: int, traced: int) -> list[int]:
    """The traced index each of ``real`` layers (or blocks) takes: the one at its depth."""
    return [j * traced // real for j in range(real)]


def running_blocks(ran: list[bool], real: int) -> list[bool]:
    """Which of ``real`` blocks run at a call where the traced blocks ``ran``: a contiguous skipped
    range keeps its structure (the real model runs its first a and last b blocks, a and b the
    traced ones'); anything else maps by depth."""
    skipped = [i for i, r in enumerate(ran) if not r]
    if not skipped:
        return [True] * real
    head, tail = skipped[0], len(ran) - 1 - skipped[-1]
    if len(skipped) == skipped[-1] - skipped[0] + 1:
        return [j < head or j >= real - tail for j in range(real)]
    return [ran[t] for t in depth_map(real, len(ran))]


def timed_steps(steps: int, n: int | None, seed: int = 0) -> list[int]:
    """The steps timed: all, or one drawn at random (``seed``) from each of n equal strata. Every
    row is timed on the same steps; the loop time scaled by steps / n is then an unbiased estimate
    (evenly spaced steps alias with a cache's period: stride 5 against MagCache's or SeaCache's
    compute-skip-skip)."""
    if n is None or n >= steps:
        return list(range(steps))
    draw = torch.Generator().manual_seed(seed)
    bounds = [round(i * steps / n) for i in range(n + 1)]
    return [lo + int(torch.randint(hi - lo, (1,), generator=draw)) for lo, hi in zip(bounds, bounds[1:])]


def blocks_ran(trace: dict, steps: list[int]) -> float:
    """The fraction of block calls that ran at ``steps`` of the trace (first branch): set against
    every step's, it shows how well the timed steps stand for the loop."""
    at = calls_by_step(trace)
    ran = [b for s in steps for b in at[s][0]["blocks"]]
    return sum(ran) / len(ran)


def full_attention(trace: dict, steps: list[int]) -> float:
    """The fraction of attention calls at ``steps`` of the trace (first branch) that computed full
    attention: what ``blocks_ran`` misses of a plan that caches attention on some steps only."""
    at = calls_by_step(trace)
    methods = [m for s in steps for m in at[s][0]["attention"]]
    return sum(m == Method.FULL.value for m in methods) / len(methods)


def traced_method(value: str, cfg_batch: bool) -> Method:
    method = Method.AST if value == SKIPPED else Method.parse(value, "trace attention")
    return method if cfg_batch else NO_CFG.get(method, method)


def runnable(rows: list[list[Method]]) -> list[list[Method]]:
    """The grid with each cell fastattn could not run as written replaced by what it runs there
    under a block cache (fastattn.layerwise.processor): forecast with one computed output reuses
    it (AST), WA-RS never refreshed refreshes (full); AST with nothing computed before it, which
    no run has, computes (full)."""
    rows = [list(r) for r in rows]
    refreshers = refreshing_methods("full")
    for l in range(len(rows[0])):
        computed, refreshed = 0, False
        for row in rows:
            m = row[l]
            if m is Method.FORECAST and computed < 2:
                m = Method.AST
            if (m is Method.AST and not computed) or (m.needs_residual and not refreshed):
                m = Method.FULL
            row[l] = m
            computed += m.computes
            refreshed |= m in refreshers
    return rows


def trace_plan(trace: dict, steps: list[int], num_layers: int, cfg_batch: bool) -> LayerPlan:
    """The plan replaying the traced attention of ``steps`` (each step's first call) on
    ``num_layers`` layers."""
    at = calls_by_step(trace)
    layer_of = depth_map(num_layers, trace["num_attention_layers"])
    rows = [[traced_method(at[s][0]["attention"][t], cfg_batch) for t in layer_of] for s in steps]
    return LayerPlan(runnable(rows), window_size=trace.get("window_size") or DEFAULT_WINDOW,
                     window_shape=trace.get("window_shape") or "band",
                     search={"algorithm": "replay", "traced_steps": list(steps)})


def loop_calls(inputs: dict, timestep_arg: str, steps: list[int], total: int, cfg: str,
               halves: list[bool] | None = None) -> list[list[dict]]:
    """Each step's transformer calls: one, or two (conditional, unconditional) where the pipeline
    runs CFG as two calls, the second left out where ``halves`` says the blocks ran on the
    conditional half only."""
    halves = halves or [False] * len(steps)
    out = []
    for s, half in zip(steps, halves, strict=True):
        call = step_inputs(inputs, timestep_arg, s, total)
        out.append([call] * (2 if cfg == CFG_CALLS and not half else 1))
    return out


def run_calls(transformer: torch.nn.Module, steps_calls: list[list[dict]], keep: bool = False) -> list:
    """Run the calls in order; their outputs where ``keep``."""
    outputs = []
    with torch.no_grad():
        for calls in steps_calls:
            for call in calls:
                out = transformer(**call)
                if keep:
                    outputs.append(out)
    return outputs


class ReplayBlock(ModelHook):
    """One block's replay: run it where the trace ran its mapped block (keeping its residuals,
    per CFG branch), else its inputs plus the residuals of its last run. Pure tensor work: the
    decision is Python state, read without a host sync."""

    def __init__(self, replay: "Replay", index: int):
        super().__init__()
        self.replay, self.index = replay, index
        self.residuals: dict[int, tuple] = {}  # branch -> (hidden residual, context residual or None, tuple length)

    def initialize_hook(self, module):
        self.meta = TransformerBlockRegistry.get(type(module))
        return module

    def new_forward(self, module, *args, **kwargs):
        meta = self.meta
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        joint = meta.return_encoder_hidden_states_index is not None
        context = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs) \
            if joint else None
        branch = self.replay.handle.counter.branch
        cached = self.residuals.get(branch)
        if cached is not None and not self.replay.runs(self.index):
            hidden_residual, context_residual, length = cached
            if length is None:
                return hidden + hidden_residual
            out = [None] * length
            out[meta.return_hidden_states_index] = hidden + hidden_residual
            out[meta.return_encoder_hidden_states_index] = context + context_residual
            return tuple(out)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if isinstance(out, tuple):
            self.residuals[branch] = (out[meta.return_hidden_states_index] - hidden,
                                      out[meta.return_encoder_hidden_states_index] - context if joint else None,
                                      len(out))
        else:
            self.residuals[branch] = (out - hidden, None, None)
        return out


class Replay:
    """A trace replayed on ``transformer`` over ``steps`` (trace step indices, in order): its plan
    applied through fastattn, a :class:`ReplayBlock` on each block some call skips. Use as a
    context manager; :meth:`reset` before each loop."""

    def __init__(self, transformer: torch.nn.Module, trace: dict, steps: list[int], cfg: str, name: str = "row"):
        adapter = get_adapter(transformer)
        self.transformer, self.steps, self.cfg = transformer, list(steps), cfg
        self.blocks = adapter.blocks(transformer)
        at = calls_by_step(trace)
        first = [at[s][0] for s in self.steps]
        halves = [0 < c["rows"] < c["call_rows"] for c in first]  # rows 0: no block ran (a block cache)
        if cfg == CFG_BATCH and any(halves):
            step = self.steps[halves.index(True)]
            raise Unreplayable(f"row {name}: its trace runs the blocks on the conditional half of the CFG batch "
                               f"(step {step}: FasterCache's unconditional skip), which this replay does not "
                               f"reproduce on a CFG-batched model")
        self.halves = halves if cfg == CFG_CALLS else [False] * len(self.steps)
        self.plan = trace_plan(trace, self.steps, len(adapter.attention_layers(transformer)), cfg == CFG_BATCH)
        branches = 2 if cfg == CFG_CALLS else 1
        # per replayed step, per branch: which real blocks run
        self.running = [[running_blocks(at[s][min(b, len(at[s]) - 1)]["blocks"], len(self.blocks))
                         for b in range(branches)] for s in self.steps]
        self.hooked = [j for j in range(len(self.blocks))
                       if any(not ran[j] for step in self.running for ran in step)]
        self.handle = None
        self.hooks: list[tuple[ReplayBlock, bool]] = []  # (hook, whether its registry is ours)

    def runs(self, index: int) -> bool:
        """Whether block ``index`` runs at the call being made (step and branch from the handle)."""
        counter = self.handle.counter
        step = self.running[counter.step]
        return step[min(counter.branch, len(step) - 1)][index]

    def calls(self, inputs: dict, timestep_arg: str, total: int) -> list[list[dict]]:
        return loop_calls(inputs, timestep_arg, self.steps, total, self.cfg, self.halves)

    def __enter__(self) -> "Replay":
        self.handle = apply_fastattn(self.transformer, self.plan)
        try:
            for j in self.hooked:
                hook, ours = ReplayBlock(self, j), not hasattr(self.blocks[j], "_diffusers_hook")
                HookRegistry.check_if_exists_or_initialize(self.blocks[j]).register_hook(hook, HOOK_NAME)
                self.hooks.append((hook, ours))
        except BaseException:
            self.remove()
            raise
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset(self) -> None:
        """A new generation: residuals dropped, fastattn's caches and step count reset (it also
        sees the block hooks, so its layers expect skipped calls)."""
        for hook, _ in self.hooks:
            hook.residuals.clear()
        self.handle.reset()

    def remove(self) -> None:
        for hook, ours in self.hooks:
            block = self.blocks[hook.index]
            registry = block._diffusers_hook
            registry.remove_hook(HOOK_NAME, recurse=False)
            if ours and not registry.hooks:  # the block as it was: no registry, the class's forward
                del block._diffusers_hook
                block.__dict__.pop("forward", None)
        self.hooks.clear()
        remove_fastattn(self.transformer)


__all__ = ["Replay", "ReplayBlock", "Unreplayable", "calls_by_step", "depth_map", "load_trace", "loop_calls",
           "run_calls", "running_blocks", "runnable", "timed_steps", "blocks_ran", "trace_plan", "trace_steps"]
