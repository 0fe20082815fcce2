"""Compression-plan searches: DiTFastAttn's greedy Algorithm 1, DiTFastAttnV2's head-wise search, and the
budgeted search over V1's methods with V2's integer program."""

from .budget import search_budget_plan
from .greedy import search_plan
from .headwise import search_headwise_plan
from .losses import LOSSES, get_loss, mean_relative_absolute_error

__all__ = ["LOSSES", "get_loss", "mean_relative_absolute_error", "search_budget_plan", "search_headwise_plan", "search_plan"]
