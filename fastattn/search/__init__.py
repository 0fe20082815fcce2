"""Compression-plan searches: DiTFastAttn's greedy Algorithm 1 and DiTFastAttnV2's head-wise search."""

from .greedy import search_plan
from .headwise import search_headwise_plan
from .losses import LOSSES, get_loss, mean_relative_absolute_error

__all__ = ["LOSSES", "get_loss", "mean_relative_absolute_error", "search_headwise_plan", "search_plan"]
