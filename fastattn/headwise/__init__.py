"""DiTFastAttnV2 for multimodal DiTs: head-wise arrow attention and head-wise caching.

The family's plan type (:class:`HeadPlan`), method vocabulary, processor and apply function,
and the pieces of its search (RSE, the per-layer integer program, latency tables); the search
itself is :func:`fastattn.search.search_headwise_plan`.
"""

from .apply import apply_headwise
from .latency import LatencyTable
from .methods import CACHE, CFG, FULL, HeadMethod, arrow, arrow_rs
from .milp import choose_head_methods, greedy_head_methods
from .plan import HeadPlan
from .rse import relative_squared_error

__all__ = ["CACHE", "CFG", "FULL", "HeadMethod", "HeadPlan", "LatencyTable", "apply_headwise", "arrow", "arrow_rs",
           "choose_head_methods", "greedy_head_methods", "relative_squared_error"]
