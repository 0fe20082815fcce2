"""Install and remove a plan family on a diffusers pipeline or transformer, and count its calls.

The one step-and-branch counter of every family. Step tracking needs nothing from the pipeline:
a forward pre-hook on the transformer reads the timestep argument of every call (the adapter
names it, ``timestep`` by default), and a new step starts when its value changes. Whatever calls
the model (a CFG batch, a ``forward_with_cfg``-style wrapper, or a pipeline that runs the
conditional and unconditional passes as separate calls, as FLUX with true CFG and Wan do), each denoising step is counted once;
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
call ``handle.reset()``.

Each feature is a named part (:mod:`fastattn.features`: branch parking, the processors, block
caches, step counting, the scheduler wrapper, compile limits, the cache store, CUDA graphs) that
the handle keeps in a registry in the order installed, so :func:`remove_fastattn` takes them off
in reverse and restores the model exactly: the original processor objects, no hooks, no extra
attributes. The handle itself only counts each call and hands it to its parts in order.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .family import CachingProcessor, CallInfo, FamilyState
from .features.block_caches import BlockCaches
from .features.branches import BranchParking
from .features.compile import RecompileLimits
from .features.graphs import CudaGraphs
from .features.host_caches import HostCaches
from .features.part import Parts
from .features.processors import FamilyProcessors
from .features.scheduler import SchedulerWrapper
from .features.steps import StepCounter, StepCounting
from .models import get_adapter
from .utils.moved import forward_moved

_HANDLE_ATTR = "_fastattn_handle"
# Names that moved to the feature that owns them
__getattr__ = forward_moved(__name__, {
    "count_steps": "fastattn.features.steps", "block_cache_installed": "fastattn.features.block_caches",
    "compiled_modules": "fastattn.features.compile", "group_offloading_enabled": "fastattn.features.offloading"})


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


class FastAttnHandle:
    """Everything installed on one transformer: the family's state and processors, the counter
    that drives them call by call, and the parts (:attr:`parts`) that make up the features."""

    def __init__(self, transformer: nn.Module, adapter, state: FamilyState, processors: list[CachingProcessor],
                 scheduler=None):
        self.transformer, self.adapter, self.scheduler = transformer, adapter, scheduler
        self.state, self.processors = state, processors
        self.counter = StepCounter(adapter.timestep_arg)
        self.parts = Parts()
        self.on_generation: Callable[[int], None] | None = None  # called with the scheduler's step count
        # Stands in for the transformer's forward during a call when set (the greedy search
        # decides a step by running the forward several times); it gets the call's arguments.
        self.intercept: Callable | None = None
        self.raw_forward: Callable | None = None  # the forward the counting wrapper calls
        self.graphs = None  # a fastattn.cuda_graphs.StepGraphs while the cuda_graphs part is on

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
        """Run ``plan`` from the next generation on (it was checked against the model); the
        parts hear of it (the compile part raises dynamo's recompile limit to what it needs)."""
        self.state.set_plan(plan)
        self.reset()
        for part in self.parts:
            part.plan_set(self)

    def reset(self) -> None:
        """Start a new generation: step 0 next, all caches dropped (kept in place with static
        caches: captured graphs point at them; a plan never reads a cache before writing it).
        Parts are reset in reverse order, as removal undoes them: what a later part holds
        (prefetches of caches) goes before what it refers to (the caches)."""
        for part in reversed(self.parts):
            part.reset(self)

    def begin_call(self, module, args, kwargs) -> None:
        """Count a transformer call and hand it to the parts, in order (the step hook calls this
        outside any torch.compile graph: it only updates Python state)."""
        self.state.check_seq_len()  # the previous call's, where a compiled layer only recorded it
        counter = self.counter
        t = counter.timestep_key(module, args, kwargs)
        plan = self.state.plan
        if plan is not None and counter.starts_step(t) and (counter.step + 1 >= plan.num_steps or counter.restarts(t)):
            self.reset()  # a new generation without a scheduler reset
        step, branch = counter.advance(t)
        grid = self.adapter.token_grid(module, args, kwargs)
        call = CallInfo(step, branch, self.adapter.cfg_layout(module, args, kwargs), grid,
                        timestep=counter.value_of(t), image_tokens=self.adapter.image_tokens(module, args, kwargs, grid))
        for part in self.parts:
            part.begin_call(self, call)

    def run(self, *args, **kwargs):
        """The counted call's forward: the search's stand-in, a graph replay while a plan runs
        under CUDA graphs, or the transformer's own."""
        if self.intercept is not None:
            return self.intercept(*args, **kwargs)
        if self.graphs is not None and self.state.plan is not None:
            return self.graphs.run(self.raw_forward, self.state.layout(), args, kwargs)
        return self.raw_forward(*args, **kwargs)

    def new_generation(self, num_steps: int) -> None:
        """The scheduler set a schedule of ``num_steps`` steps: a new generation, its step count
        checked against the plan (or handed to ``on_generation``)."""
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
        """Replay each step layout from a CUDA graph after its first eager run (the
        :class:`~fastattn.features.graphs.CudaGraphs` part).

        Caches become static buffers (overwritten in place, kept across generations). Only
        plan-driven generations go through graphs; a search runs eagerly.
        """
        self.parts.add(self, CudaGraphs(mode, capture_at))
        return self.graphs

    def disable_cuda_graphs(self) -> None:
        """Back to eager steps; caches are freed after their last use again."""
        self.parts.remove(self, CudaGraphs.name)

    # -- install / uninstall ----------------------------------------------------------------
    def install(self) -> None:
        """Put the parts on the model, in order (see :func:`install`)."""
        for part in (BranchParking(), FamilyProcessors(), BlockCaches(), StepCounting(), SchedulerWrapper(),
                     RecompileLimits(), HostCaches()):
            self.parts.add(self, part)
        setattr(self.transformer, _HANDLE_ATTR, self)

    def uninstall(self) -> None:
        """Restore the model exactly as it was (what :func:`remove_fastattn` calls): every part
        removed, the last installed first."""
        self.parts.remove_all(self)
        self.transformer.__dict__.pop(_HANDLE_ATTR, None)


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


__all__ = ["FastAttnHandle", "StepCounter", "get_handle", "install", "remove_fastattn", "split_pipeline"]
