"""DiTFastAttn: layer-wise window attention with residual sharing, attention sharing across
timesteps and across CFG, and attention forecasting.

The family's plan type (:class:`LayerPlan`), method vocabulary, processor and its shared state,
apply function and FLOPs; its searches are :func:`fastattn.search.search_plan` and
:func:`fastattn.search.search_budget_plan`.
"""

from .apply import apply_layerwise, install_layerwise
from .flops import method_cost, window_pair_count
from .methods import PAPER_STRATEGIES, Method, parse_strategies
from .plan import WINDOW_SHAPES, LayerPlan, check_window_shape
from .processor import FastAttnProcessor, StepState
from .video_flops import VideoShape, video_attention_flops

__all__ = ["PAPER_STRATEGIES", "WINDOW_SHAPES", "FastAttnProcessor", "LayerPlan", "Method", "StepState", "VideoShape",
           "apply_layerwise", "check_window_shape", "install_layerwise", "method_cost", "parse_strategies",
           "video_attention_flops", "window_pair_count"]
