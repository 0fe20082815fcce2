"""Install and remove a plan family on a diffusers pipeline or transformer, and count its calls.

The one step-and-branch counter of every family. Step tracking needs nothing from the pipeline:
a forward pre-hook on the transformer reads the ``timestep`` argument of every call, and a new
step starts when its value changes. Whatever calls the model (a CFG batch, a
``forward_with_cfg``-style wrapper, or a pipeline that runs the conditional and unconditional
passes as separate calls, as FLUX with true CFG and Wan do), each denoising step is counted once;
the calls within one step are its *branches*, and the handle keeps every processor's caches per
branch. A call without a timestep counts as a step of its own. For each call the adapter reads
where the CFG halves are (if the batch holds both) and the token grid, and the family's state
gets all of it as a :class:`~fastattn.family.CallInfo`.

Wrappers that call ``model.forward(...)`` directly (Open-Sora's ``forward_with_cfg``) skip
``__call__`` and its hooks, so the instance's ``forward`` is wrapped as well; a call through
``__call__`` is counted by the pre-hook and not again by the wrapper. Wrapping the scheduler's
``set_timesteps`` marks the start of each generation (caches dropped, step count checked against
the plan). Without a pipeline the count wraps to step 0 after the plan's last step, and starts
again when a call's timestep falls back to step 0's (a generation interrupted and run anew); or
call ``handle.reset()``. Everything installed is recorded on the handle so :func:`remove_fastattn`
restores the model exactly: the original processor objects, no hooks, no extra attributes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .cuda_graphs import StepGraphs
from .family import CachingProcessor, CallInfo, FamilyState
from .models import get_adapter
from .models.adapters.base import call_argument

_HANDLE_ATTR = "_fastattn_handle"


def split_pipeline(obj) -> tuple[nn.Module, Any]:
    """(transformer, scheduler or None) from a pipeline or a bare transformer."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return _uncompiled(transformer), getattr(obj, "scheduler", None)
    if isinstance(obj, nn.Module):
        return _uncompiled(obj), None
    raise TypeError(f"expected a diffusers pipeline with .transformer or a transformer module, got {type(obj).__name__}")


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wrapped (its ``_orig_mod``), or the module itself."""
    return getattr(module, "_orig_mod", module)


def count_steps(timesteps) -> int:
    """Denoising steps in a schedule: runs of equal consecutive timesteps count once, as the
    step counter counts them."""
    values = [float(t) for t in timesteps]
    return sum(1 for i, t in enumerate(values) if i == 0 or t != values[i - 1])


class StepCounter:
    """Step and branch of every transformer call, from its timestep value."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step = -1  # the step being run, -1 before the first call
        self.branch = 0  # the call's index within its step
        self.calls = 0  # transformer calls since the last reset
        self._last_timestep: float | None = None
        self._first_timestep: float | None = None  # step 0's: seen again later, a new generation began

    def timestep_of(self, module, args, kwargs) -> float | None:
        """The call's timestep as a number (its first element), or None when it has none."""
        t = call_argument(module, args, kwargs, "timestep")
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            # One host read per transformer call (not per layer): the schedulers' step() already
            # syncs every step, and tensor identity is no substitute (the allocator reuses
            # addresses, so a fresh timestep tensor can look like the previous step's).
            return float(t.reshape(-1)[0])
        return float(t) if isinstance(t, (int, float)) else None

    def starts_step(self, timestep: float | None) -> bool:
        return timestep is None or self.step < 0 or timestep != self._last_timestep

    def restarts(self, timestep: float | None) -> bool:
        """Whether a call opens a new generation: a later step's call whose timestep falls back to
        step 0's (a generation interrupted before its last step, then started again without a
        scheduler to say so). Schedules never return to their first timestep within a generation."""
        return (timestep is not None and self.step > 0 and timestep == self._first_timestep
                and timestep != self._last_timestep)

    def advance(self, timestep: float | None) -> tuple[int, int]:
        """Count a call with ``timestep``: its (step, branch)."""
        if self.starts_step(timestep):
            self.step, self.branch = self.step + 1, 0
            if self.step == 0:
                self._first_timestep = timestep
        else:
            self.branch += 1
        self._last_timestep = timestep
        self.calls += 1
        return self.step, self.branch


def block_cache_installed(transformer: nn.Module) -> bool:
    """Whether diffusers' cache hooks (FirstBlockCache, MagCache, PAB, TaylorSeer, FasterCache)
    sit on a block or layer of the model: they can skip a layer's attention call at a step."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
               for name, m in transformer.named_modules() if name)


def _not_compiled(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class FastAttnHandle:
    """Everything installed on one transformer: the family's state and processors, the hooks,
    and the counter that drives them call by call."""

    def __init__(self, transformer: nn.Module, adapter, state: FamilyState, processors: list[CachingProcessor],
                 scheduler=None):
        self.transformer, self.adapter, self.scheduler = transformer, adapter, scheduler
        self.state, self.processors = state, processors
        self.originals = [a.processor for a in adapter.attention_layers(transformer)]
        self.counter = StepCounter()
        self.on_generation: Callable[[int], None] | None = None  # called with the scheduler's step count
        # Stands in for the transformer's forward during a call when set (the greedy search
        # decides a step by running the forward several times); it gets the call's arguments.
        self.intercept: Callable | None = None
        self.raw_forward: Callable | None = None  # the forward the counting wrapper calls
        self.graphs = None  # a fastattn.cuda_graphs.StepGraphs while CUDA graphs are on
        self._hooks: list[Any] = []
        self._forward_counted = False  # set by the pre-hook, so the forward wrapper does not count again
        self._fetch_ahead = False  # host caches: prefetch this generation's reads (not under graphs or compile)
        self._previous_forward = None  # an instance-level forward someone installed before us
        self._branch_caches: dict[int, list[tuple]] = {}
        self._installed = False

    @property
    def plan(self):
        """The plan being run (None while a search drives the processors)."""
        return self.state.plan

    @property
    def branch(self) -> int:
        """Which call of its step the last call was: 0, or 1 for a second (separate CFG) pass."""
        return self.counter.branch

    # -- plans and generations --------------------------------------------------------------
    def set_plan(self, plan) -> None:
        """Run ``plan`` from the next generation on (it was checked against the model). Dynamo's
        recompile limit is raised to the graphs the plan needs under ``torch.compile``
        (:func:`fastattn.compile.allow_plan_recompiles`), so no step falls back to eager."""
        self.state.set_plan(plan)
        self.reset()
        from .compile import allow_plan_recompiles

        allow_plan_recompiles(self)

    def reset(self) -> None:
        """Start a new generation: step 0 next, all caches dropped (kept in place with static
        caches: captured graphs point at them; a plan never reads a cache before writing it)."""
        if self.state.cache_store is not None:
            self.state.cache_store.release()
        if self.state.static_caches:
            self._switch_branch(self.counter.branch, 0)
        else:
            self._branch_caches.clear()
            for p in self.processors:
                p.reset()
        self.counter.reset()
        self.state.reset()
        if hasattr(self.state, "blocks_may_skip"):
            self.state.blocks_may_skip = block_cache_installed(self.transformer)

    def _switch_branch(self, old: int, new: int) -> None:
        """Park the caches of branch ``old``, which just ran, and load those of ``new``."""
        if old == new:
            return
        self._branch_caches[old] = [p.park() for p in self.processors]
        parked = self._branch_caches.get(new)
        for i, p in enumerate(self.processors):
            if parked is None:
                p.reset()
            else:
                p.restore(parked[i])

    def _begin_call(self, module, args, kwargs):
        # Runs outside any torch.compile graph (see install): it only updates Python state.
        self.state.check_seq_len()  # the previous call's, where a compiled layer only recorded it
        counter = self.counter
        t = counter.timestep_of(module, args, kwargs)
        plan = self.state.plan
        if plan is not None and counter.starts_step(t) and (counter.step + 1 >= plan.num_steps or counter.restarts(t)):
            self.reset()  # a new generation without a scheduler reset
        previous = counter.branch
        step, branch = counter.advance(t)
        self._switch_branch(previous, branch)
        call = CallInfo(step, branch, self.adapter.cfg_layout(module, args, kwargs),
                        self.adapter.token_grid(module, args, kwargs), timestep=t)
        self.state.on_call(call)
        store = self.state.cache_store
        if store is not None and store.device is not None:  # host caches: fetch this call's reads ahead
            if step == 0 and branch == 0:  # a walk over the modules: once per generation, not per call
                self._fetch_ahead = self.graphs is None and not compiled_modules(self.transformer)
            store.begin_call(self.state.call_reads() if self._fetch_ahead else None, self.processors)
        self._forward_counted = True
        return None

    def _counting_forward(self, *args, **kwargs):
        if not self._installed:  # removed, but a wrapper put on top of ours (offloading) still calls it
            return self.raw_forward(*args, **kwargs)
        if not self._forward_counted:  # called as model.forward(...), bypassing __call__'s hooks
            self._begin_call(self.transformer, args, kwargs)
        self._forward_counted = False
        if self.intercept is not None:
            return self.intercept(*args, **kwargs)
        if self.graphs is not None and self.state.plan is not None:
            return self.graphs.run(self.raw_forward, self.state.layout(), args, kwargs)
        return self.raw_forward(*args, **kwargs)

    def _new_generation(self, num_steps: int) -> None:
        self.state.check_seq_len()
        self.reset()
        if self.on_generation is not None:
            self.on_generation(num_steps)
        elif self.state.plan is not None and num_steps != self.state.plan.num_steps:
            raise ValueError(
                f"plan has {self.state.plan.num_steps} steps but the scheduler runs {num_steps}: "
                f"pass num_inference_steps={self.state.plan.num_steps} or search a plan for {num_steps}"
            )

    # -- CUDA graphs ------------------------------------------------------------------------
    def enable_cuda_graphs(self, mode: str = "cuda", capture_at: int = 1):
        """Replay each step layout from a CUDA graph after its first eager run.

        Caches become static buffers (overwritten in place, kept across generations). Only
        plan-driven generations go through graphs; a search runs eagerly.
        """
        if not self.state.supports_cuda_graphs:
            raise NotImplementedError(f"cuda_graphs: {type(self.state).__name__} plans run eagerly for now")
        refusal = self.state.cuda_graphs_refusal()
        if refusal:
            raise NotImplementedError(refusal)
        store = self.state.cache_store
        if store is not None and store.device is not None:
            raise ValueError("cuda_graphs: caches in host memory (cache_device) cannot be replayed from a graph")
        if group_offloading_enabled(self.transformer):
            raise ValueError("cuda_graphs: the transformer has diffusers group offloading, whose weights move "
                             "during each forward; a graph replays fixed addresses")
        if compiled_modules(self.transformer):
            raise ValueError("cuda_graphs: the transformer (or its blocks) is compiled with torch.compile; use one or "
                             "the other: compiling replaces fastattn's CUDA graphs")
        self.graphs = StepGraphs(self.processors, mode=mode, capture_at=capture_at, module=self.transformer)
        self.state.static_caches = True
        return self.graphs

    def disable_cuda_graphs(self) -> None:
        """Back to eager steps; caches are freed after their last use again."""
        self.graphs = None
        self.state.static_caches = False

    # -- install / uninstall ----------------------------------------------------------------
    def install(self) -> None:
        """Put the processors, the counting hooks and the scheduler wrapper on the model (see :func:`install`)."""
        for attn, proc in zip(self.adapter.attention_layers(self.transformer), self.processors, strict=True):
            attn.set_processor(proc)
        # The step hook and the processors are left out of torch.compile graphs: they read and
        # write Python state that changes every step, which would otherwise force recompiles.
        hook = _not_compiled(self._begin_call)
        self._hooks.append(self.transformer.register_forward_pre_hook(hook, with_kwargs=True))
        self._previous_forward = self.transformer.__dict__.get("forward")
        self.raw_forward = self.transformer.forward
        self.transformer.forward = self._counting_forward
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            original = self.scheduler.set_timesteps

            @functools.wraps(original)
            def set_timesteps(*args, **kwargs):
                out = original(*args, **kwargs)
                self._new_generation(count_steps(self.scheduler.timesteps))
                return out

            set_timesteps._fastattn_wrapper = True
            self.scheduler.set_timesteps = set_timesteps
        setattr(self.transformer, _HANDLE_ATTR, self)
        self._installed = True

    def uninstall(self) -> None:
        """Restore the model exactly as it was (what :func:`remove_fastattn` calls). Where a
        wrapper was installed over our ``forward`` since (diffusers' offloading hooks, accelerate's),
        ours stays under it and only passes the call on."""
        self._installed = False
        if self.transformer.__dict__.get("forward") == self._counting_forward:
            if self._previous_forward is None:
                del self.transformer.forward
            else:
                self.transformer.forward = self._previous_forward
        for attn, original in zip(self.adapter.attention_layers(self.transformer), self.originals, strict=True):
            attn.set_processor(original)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.scheduler is not None and getattr(self.scheduler.__dict__.get("set_timesteps"), "_fastattn_wrapper", False):
            del self.scheduler.set_timesteps
        self.disable_cuda_graphs()
        self._branch_caches.clear()
        for p in self.processors:
            p.reset()
        if self.state.cache_store is not None:
            self.state.cache_store.release(buffers=True)
        self.transformer.__dict__.pop(_HANDLE_ATTR, None)


def compiled_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules that ``nn.Module.compile`` (or regional compilation) compiled."""
    return [m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def group_offloading_enabled(module: nn.Module) -> bool:
    """Whether diffusers' group offloading hooks are on ``module`` or a submodule."""
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "get_hook", lambda _: None)("group_offloading") is not None:
            return True
    return False


def install(pipe_or_transformer, make_family: Callable) -> FastAttnHandle:
    """Put a family's processors and the counting hooks on the model, replacing any earlier
    installation. ``make_family(transformer, adapter, layers)`` returns (state, processors)."""
    transformer, scheduler = split_pipeline(pipe_or_transformer)
    remove_fastattn(transformer)
    adapter = get_adapter(transformer)
    state, processors = make_family(transformer, adapter, adapter.attention_layers(transformer))
    handle = FastAttnHandle(transformer, adapter, state, processors, scheduler)
    handle.install()
    return handle


def remove_fastattn(pipe_or_transformer) -> None:
    """Undo :func:`~fastattn.apply_fastattn`; a no-op on a model without fastattn."""
    transformer, _ = split_pipeline(pipe_or_transformer)
    handle = transformer.__dict__.get(_HANDLE_ATTR)
    if handle is not None:
        handle.uninstall()


def get_handle(pipe_or_transformer) -> FastAttnHandle | None:
    """The :class:`FastAttnHandle` fastattn installed on a pipeline's transformer, or None.

    Its ``counter`` says which step and branch ran last; ``reset()`` starts a new generation
    on a bare transformer; ``enable_cuda_graphs()`` turns CUDA graphs on."""
    transformer, _ = split_pipeline(pipe_or_transformer)
    return transformer.__dict__.get(_HANDLE_ATTR)


__all__ = ["FastAttnHandle", "StepCounter", "block_cache_installed", "count_steps", "get_handle",
           "group_offloading_enabled", "install", "remove_fastattn",
           "split_pipeline"]
