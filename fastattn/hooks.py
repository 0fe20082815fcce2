"""Switch compression on and off on a diffusers pipeline or transformer, and count steps.

Step tracking needs nothing from the pipeline: a forward pre-hook on the transformer counts
calls (one call is one denoising step); wrapping the scheduler's ``set_timesteps`` marks the
start of each generation (reset the caches, check the step count against the plan). Without a
pipeline, the count wraps to step 0 after the plan's last step, or call ``handle.reset()``.
Everything installed is recorded on a handle so :func:`remove_fastattn` restores the model
exactly: the original processor objects, no hooks, no extra attributes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

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
    _hooks: list[Any] = field(default_factory=list)
    _rows: dict[str, list] = field(default_factory=dict)

    # -- plan mode ------------------------------------------------------------------------
    def set_plan(self, plan: CompressionPlan) -> None:
        plan.check_model(self.adapter.describe(self.transformer))
        self.plan = plan
        self.state.window_fraction = plan.window_fraction
        self._rows = {"refresh": plan.refresh_mask(), "keep": plan.output_cache_mask()}
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step 0 next, all caches dropped."""
        self.state.calls = 0
        self.state.step = -1
        for p in self.processors:
            p.reset()

    def _begin_step(self, module, args, kwargs=None):
        st = self.state
        if self.plan is None:  # search mode: the search sets the methods itself
            st.step = st.calls
            st.calls += 1
            return None
        if st.calls >= self.plan.num_steps:  # a new generation without a scheduler reset
            self.reset()
        st.step = st.calls
        st.calls += 1
        s = st.step
        st.set_step(self.plan.methods[s], self._rows["refresh"][s], self._rows["keep"][s])
        return None

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
        self._hooks.append(self.transformer.register_forward_pre_hook(self._begin_step))
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            original = self.scheduler.set_timesteps

            @functools.wraps(original)
            def set_timesteps(*args, **kwargs):
                out = original(*args, **kwargs)
                self._new_generation(len(self.scheduler.timesteps))
                return out

            set_timesteps._fastattn_wrapper = True
            self.scheduler.set_timesteps = set_timesteps
        setattr(self.transformer, _HANDLE_ATTR, self)

    def uninstall(self) -> None:
        for attn, original in zip(self.adapter.attention_layers(self.transformer), self.originals, strict=True):
            attn.set_processor(original)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.scheduler is not None and getattr(self.scheduler.__dict__.get("set_timesteps"), "_fastattn_wrapper", False):
            del self.scheduler.set_timesteps
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
    processors = [FastAttnProcessor(i, state, attn.processor) for i, attn in enumerate(layers)]
    handle = FastAttnHandle(transformer, adapter, state, processors, [a.processor for a in layers], scheduler)
    handle.install()
    return handle


def apply_fastattn(pipe_or_transformer, plan: CompressionPlan) -> FastAttnHandle:
    """Compress a pipeline's (or a transformer's) self-attention according to ``plan``.

    The plan is checked against the model first (layer and head counts, class) and against the
    scheduler's step count at the start of every generation.
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
    if plan.is_headwise:  # DiTFastAttnV2: per-head methods on a joint-attention model
        from .headwise.apply import apply_headwise

        return apply_headwise(pipe_or_transformer, plan)
    transformer, _ = split_pipeline(pipe_or_transformer)
    plan.check_model(get_adapter(transformer).describe(transformer))  # before touching the model
    handle = install_handle(pipe_or_transformer, plan.window_fraction)
    handle.set_plan(plan)
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
