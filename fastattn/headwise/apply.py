"""Install head-wise processors on a joint-attention transformer and drive them step by step.

Step tracking, scheduler wrapping and clean removal are :class:`~fastattn.hooks.FastAttnHandle`'s;
this handle only swaps in the per-head state and processors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hooks import FastAttnHandle, remove_fastattn, split_pipeline
from ..models.mmdit import MMDiTAdapter
from ..models.registry import get_adapter
from ..plan import CompressionPlan
from .processor import HeadStepState, HeadwiseJointProcessor


def joint_adapter(transformer) -> MMDiTAdapter:
    adapter = get_adapter(transformer)
    if not isinstance(adapter, MMDiTAdapter):
        raise ValueError(f"head-wise plans need a joint-attention model (SD3, FLUX); "
                         f"{type(transformer).__name__} has none")
    return adapter


@dataclass
class HeadwiseHandle(FastAttnHandle):
    def set_plan(self, plan: CompressionPlan) -> None:
        if not plan.is_headwise:
            raise ValueError("plan has no plan.heads: apply a layer-wise plan with apply_fastattn")
        plan.check_model(self.adapter.describe(self.transformer))
        self.plan = plan
        # a layer keeps its per-head outputs at step s when a head of it is cached at s + 1
        keep = [[any(not m.computes for m in layer) for layer in plan.heads[s + 1]] for s in range(plan.num_steps - 1)]
        self._rows = {"keep": keep + [[False] * plan.num_layers]}
        self.reset()

    def _begin_step(self, module, args, kwargs=None):
        st = self.state
        if self.plan is not None and st.calls >= self.plan.num_steps:
            self.reset()
        st.step = st.calls
        st.calls += 1
        if self.plan is not None:
            st.methods, st.keep = self.plan.heads[st.step], self._rows["keep"][st.step]
        self._forward_counted = True  # the base handle's forward wrapper must not count again
        return None


def install_headwise(pipe_or_transformer) -> HeadwiseHandle:
    transformer, scheduler = split_pipeline(pipe_or_transformer)
    adapter = joint_adapter(transformer)
    remove_fastattn(transformer)
    layers = adapter.attention_layers(transformer)
    state = HeadStepState(len(layers), int(layers[0].heads))
    processors = [HeadwiseJointProcessor(i, state, attn.processor, adapter) for i, attn in enumerate(layers)]
    handle = HeadwiseHandle(transformer, adapter, state, processors, [a.processor for a in layers], scheduler)
    handle.install()
    return handle


def apply_headwise(pipe_or_transformer, plan: CompressionPlan) -> HeadwiseHandle:
    """Compress a joint-attention pipeline (or transformer) with a head-wise plan."""
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
    transformer, _ = split_pipeline(pipe_or_transformer)
    if not plan.is_headwise:
        raise ValueError("plan has no plan.heads: apply a layer-wise plan with apply_fastattn")
    adapter = joint_adapter(transformer)
    plan.check_model(adapter.describe(transformer))  # before touching the model
    if not adapter.cfg_batch and any(m.kind == "cfg" for row in plan.heads for layer in row for m in layer):
        raise ValueError(f"plan.heads uses 'cfg' (CFG sharing) but {adapter.class_name} pipelines run no CFG batch")
    handle = install_headwise(pipe_or_transformer)
    handle.set_plan(plan)
    return handle
