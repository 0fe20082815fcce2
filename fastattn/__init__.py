"""fastattn: post-training attention compression for diffusion transformers.

    from fastattn import CompressionPlan, apply_fastattn, remove_fastattn, search_plan

    plan = search_plan(pipe, calibration_inputs, threshold=0.05)
    plan.save("plan.json")
    apply_fastattn(pipe, CompressionPlan.load("plan.json"))  # describe(pipe): what a plan must fit
    images = pipe(...).images
    remove_fastattn(pipe)
"""

from .apply import apply_fastattn
from .headwise.plan import HeadPlan
from .hooks import get_handle, remove_fastattn
from .layerwise.methods import PAPER_STRATEGIES, Method
from .layerwise.plan import LayerPlan
from .model_info import ModelInfo, describe
from .plan import CompressionPlan
from .search import search_budget_plan, search_headwise_plan, search_plan

__version__ = "0.2.0"

__all__ = [
    "PAPER_STRATEGIES",
    "CompressionPlan",
    "HeadPlan",
    "LayerPlan",
    "Method",
    "ModelInfo",
    "apply_fastattn",
    "describe",
    "get_handle",
    "remove_fastattn",
    "search_budget_plan",
    "search_headwise_plan",
    "search_plan",
]
