"""Switch compression on and off on a diffusers pipeline or transformer, and count steps.

Step tracking needs nothing from the pipeline: a forward pre-hook on the transformer reads the
``timestep`` argument of every call, and a new step starts when its value changes. Whatever
calls the model (a CFG batch, a ``forward_with_cfg``-style wrapper or a pipeline that runs the
conditional and unconditional passes as separate calls), each denoising step is counted once;
the calls within one step are its *branches*, and each branch keeps its own AST and WA-RS
caches. A call without a timestep counts as a step of its own. Wrappers that call
``model.forward(...)`` directly (Open-Sora's ``forward_with_cfg``) skip ``__call__`` and its
hooks, so the instance's ``forward`` is wrapped as well; a call through ``__call__`` is counted
by the pre-hook and not again by the wrapper. Wrapping the scheduler's
``set_timesteps`` marks the start of each generation (reset the caches, check the step count
against the plan). Without a pipeline, the count wraps to step 0 after the plan's last step, or
call ``handle.reset()``.
Everything installed is recorded on a handle so :func:`remove_fastattn` restores the model
exactly: the original processor objects, no hooks, no extra attributes.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .models.registry import get_adapter
from .plan import CompressionPlan
from .processor import FastAttnProcessor, StepState

_HANDLE_ATTR = "_fastattn_handle"


def split_pipeline(obj) -> tuple[nn.Module, Any]:
    """(transformer, scheduler or None) from a pipeline or a bare transformer."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, getattr(obj, "scheduler", None)
    if isinstance(obj, nn.Module):
        return obj, None
    raise TypeError(f"expected a diffusers pipeline with .transformer or a transformer module, got {type(obj).__name__}")


def _not_compiled(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _grid_width(module, args, kwargs) -> int | None:
    """Latent grid columns in tokens, from the [B, C, H, W] input and the patch size."""
    x = args[0] if args else (kwargs or {}).get("hidden_states")
    patch = getattr(getattr(module, "config", None), "patch_size", None)
    if isinstance(x, torch.Tensor) and x.ndim == 4 and isinstance(patch, int) and patch > 0:
        return x.shape[-1] // patch
    return None


def count_steps(timesteps) -> int:
    """Denoising steps in a schedule: runs of equal consecutive timesteps count once, as the
    step counter counts them."""
    values = [float(t) for t in timesteps]
    return sum(1 for i, t in enumerate(values) if i == 0 or t != values[i - 1])


@dataclass
class FastAttnHandle:
    """Everything apply installed on one transformer; drives the per-step state."""

    transformer: nn.Module
    adapter: Any
    state: StepState
    processors: list[FastAttnProcessor]
    originals: list[Any]
    scheduler: Any = None
    plan: CompressionPlan | None = None
    on_generation: Callable[[int], None] | None = None  # called with the scheduler's step count
    branch: int = 0  # index of the current call within its step (0: the first, e.g. conditional)
    _hooks: list[Any] = field(default_factory=list)
    _rows: dict[str, list] = field(default_factory=dict)
    _last_timestep: float | None = None
    raw_forward: Callable | None = None  # the forward the counting wrapper calls (the search calls it too)
    _forward_counted: bool = False  # set by the pre-hook, so the forward wrapper does not count again
    _previous_forward: Any = None  # an instance-level forward someone installed before us
    _signature: Any = None  # of the transformer's forward, to find its timestep argument
    _branch_caches: dict[int, list[tuple]] = field(default_factory=dict)
    graphs: Any = None  # a fastattn.cuda_graphs.StepGraphs while CUDA graphs are on

    # -- CUDA graphs ----------------------------------------------------------------------
    def enable_cuda_graphs(self, mode: str = "cuda", capture_at: int = 1):
        """Replay each step layout from a CUDA graph after its first eager run.

        Caches become static buffers (overwritten in place, kept across generations). Only
        plan-driven generations go through graphs; the search runs eagerly.
        """
        from .cuda_graphs import StepGraphs

        if getattr(self.state, "static_caches", None) is None:
            raise NotImplementedError(f"cuda graphs are not supported for {type(self).__name__} plans yet")
        self.graphs = StepGraphs(self.processors, mode=mode, capture_at=capture_at)
        self.state.static_caches = True
        return self.graphs

    def disable_cuda_graphs(self) -> None:
        """Back to eager steps; caches are freed after their last use again."""
        self.graphs = None
        if hasattr(self.state, "static_caches"):
            self.state.static_caches = False

    def _layout(self) -> tuple:
        """What decides which kernels a step runs on which buffers (see fastattn.cuda_graphs)."""
        st = self.state
        return (self.branch, tuple(st.methods), tuple(st.refresh), tuple(st.keep_output), st.grid_width)

    # -- plan mode ------------------------------------------------------------------------
    def set_plan(self, plan: CompressionPlan) -> None:
        plan.check_model(self.adapter.describe(self.transformer))
        self.plan = plan
        self.state.window_fraction = plan.window_fraction
        self.state.window_shape = plan.window_shape
        self._rows = {"refresh": plan.refresh_mask(), "keep": plan.output_cache_mask(),
                      "release": plan.residual_release_mask()}
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step 0 next, all caches dropped (kept in place with static
        caches: captured graphs point at them; a plan never reads a cache before writing it)."""
        if getattr(self.state, "static_caches", False):
            self._switch_branch(0)
        else:
            self._branch_caches.clear()
            for p in self.processors:
                p.reset()
        self.state.calls = 0
        self.state.step = -1
        self.branch = 0
        self._last_timestep = None

    def _timestep_of(self, args, kwargs) -> float | None:
        """The call's timestep as a number (its first element), or None when it has none."""
        try:
            t = self._signature.bind_partial(self.transformer, *args, **kwargs).arguments.get("timestep")
        except TypeError:
            t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor):
            if not t.numel():
                return None
            # One host read per transformer call (not per layer): the schedulers' step() already
            # syncs every step, and tensor identity is no substitute (the allocator reuses
            # addresses, so a fresh timestep tensor can look like the previous step's).
            return float(t.reshape(-1)[0])
        return float(t) if isinstance(t, (int, float)) else None

    def _switch_branch(self, branch: int) -> None:
        """Park the caches of the branch that just ran and load those of ``branch``."""
        self._branch_caches[self.branch] = [(p.output_cache, p.residual) for p in self.processors]
        for p, (output, residual) in zip(self.processors, self._branch_caches.get(branch, ()), strict=False):
            p.output_cache, p.residual = output, residual
        if branch not in self._branch_caches:
            for p in self.processors:
                p.reset()
        self.branch = branch

    def _begin_step(self, module, args, kwargs):
        # Runs outside any torch.compile graph (see install): it only updates Python state.
        st = self.state
        st.grid_width = _grid_width(module, args, kwargs)
        t = self._timestep_of(args, kwargs)
        new_step = t is None or st.step < 0 or t != self._last_timestep
        if new_step and self.plan is not None and st.step + 1 >= self.plan.num_steps:
            self.reset()  # a new generation without a scheduler reset
        self._last_timestep = t
        before_call = getattr(self.adapter, "before_call", None)  # e.g. Wan reads the token grid
        if before_call is not None:
            before_call(self.processors, args, kwargs)
        self._switch_branch(0 if new_step else self.branch + 1)
        if new_step:
            st.step += 1
        st.calls += 1
        if self.plan is not None:  # (without a plan the search sets the methods itself)
            s = st.step
            st.set_step(self.plan.methods[s], self._rows["refresh"][s], self._rows["keep"][s],
                        release_residual=self._rows["release"][s])
        self._forward_counted = True
        return None

    def _counting_forward(self, *args, **kwargs):
        if not self._forward_counted:  # called as model.forward(...), bypassing __call__'s hooks
            self._begin_step(self.transformer, args, kwargs)
        self._forward_counted = False
        if self.graphs is not None and self.plan is not None and self.state.write_caches:
            return self.graphs.run(self.raw_forward, self._layout(), args, kwargs)
        return self.raw_forward(*args, **kwargs)

    def _new_generation(self, num_steps: int) -> None:
        self.reset()
        if self.on_generation is not None:
            self.on_generation(num_steps)
        elif self.plan is not None and num_steps != self.plan.num_steps:
            raise ValueError(
                f"plan has {self.plan.num_steps} steps (plan.methods) but the scheduler runs "
                f"{num_steps}: pass num_inference_steps={self.plan.num_steps} or search a plan for {num_steps}"
            )

    # -- install / uninstall --------------------------------------------------------------
    def install(self) -> None:
        for attn, proc in zip(self.adapter.attention_layers(self.transformer), self.processors, strict=True):
            attn.set_processor(proc)
        self._signature = inspect.signature(type(self.transformer).forward)
        # The step hook and the processors are left out of torch.compile graphs: they read and
        # write Python state that changes every step, which would otherwise force recompiles.
        # Compiled models graph-break around attention; plans can change between generations.
        hook = _not_compiled(self._begin_step)
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

    def uninstall(self) -> None:
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
        for p in self.processors:
            p.reset()
        self.transformer.__dict__.pop(_HANDLE_ATTR, None)


def install_handle(pipe_or_transformer, window_fraction: float = 0.125) -> FastAttnHandle:
    """Put fastattn processors and hooks on the model, replacing any earlier installation."""
    transformer, scheduler = split_pipeline(pipe_or_transformer)
    remove_fastattn(transformer)
    adapter = get_adapter(transformer)
    layers = adapter.attention_layers(transformer)
    state = StepState(len(layers), adapter.cond_first, window_fraction)
    make = getattr(adapter, "make_processors", None)  # architectures with their own projections
    processors = (make(transformer, state, [a.processor for a in layers]) if make is not None
                  else [FastAttnProcessor(i, state, attn.processor) for i, attn in enumerate(layers)])
    handle = FastAttnHandle(transformer, adapter, state, processors, [a.processor for a in layers], scheduler)
    handle.install()
    return handle


def apply_fastattn(pipe_or_transformer, plan: CompressionPlan, cuda_graphs: bool = False) -> FastAttnHandle:
    """Compress a pipeline's (or a transformer's) self-attention according to ``plan``.

    The plan is checked against the model first (layer and head counts, class) and against the
    scheduler's step count at the start of every generation. ``cuda_graphs=True`` replays each
    distinct step layout from a CUDA graph (:mod:`fastattn.cuda_graphs`): worth it where the
    host cannot keep up with small kernels (about 4096 tokens or fewer).
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
    if cuda_graphs and plan.is_headwise:
        raise NotImplementedError("cuda_graphs: head-wise plans run eagerly for now")
    if plan.is_headwise:  # DiTFastAttnV2: per-head methods on a joint-attention model
        from .headwise.apply import apply_headwise

        return apply_headwise(pipe_or_transformer, plan)
    transformer, _ = split_pipeline(pipe_or_transformer)
    adapter = get_adapter(transformer)
    plan.check_model(adapter.describe(transformer))  # before touching the model
    if plan.uses_cfg_sharing() and not getattr(adapter, "cfg_batched", True):
        raise ValueError(f"plan uses 'asc' or 'wars+asc' but {adapter.class_name} runs the conditional and "
                         "unconditional passes as separate calls (no CFG batch to share across)")
    if cuda_graphs and next(transformer.parameters()).device.type != "cuda":
        raise ValueError("cuda_graphs=True needs the transformer on a CUDA device")
    handle = install_handle(pipe_or_transformer, plan.window_fraction)
    handle.set_plan(plan)
    if cuda_graphs:
        handle.enable_cuda_graphs()
    return handle


def remove_fastattn(pipe_or_transformer) -> None:
    """Undo :func:`apply_fastattn`; a no-op on a model without fastattn."""
    transformer, _ = split_pipeline(pipe_or_transformer)
    handle = transformer.__dict__.get(_HANDLE_ATTR)
    if handle is not None:
        handle.uninstall()


def get_handle(pipe_or_transformer) -> FastAttnHandle | None:
    transformer, _ = split_pipeline(pipe_or_transformer)
    return transformer.__dict__.get(_HANDLE_ATTR)


__all__ = ["FastAttnHandle", "apply_fastattn", "get_handle", "install_handle", "remove_fastattn"]
